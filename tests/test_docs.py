"""The repository explains itself: README, CHANGELOG and docs/ link only to files inside the repository.

Every relative link must name an existing file or folder of the repository (and an existing heading when
it has an anchor); nothing may point outside it (``../shared``, absolute paths). Web links (``https://``)
are citations and are not checked.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(h) for h in re.findall(r"^#+ (.*)$", path.read_text(), re.M)}


def test_docs_exist():
    assert (ROOT / "docs" / "architecture.md").is_file() and (ROOT / "docs" / "benchmarks.md").is_file()
    readme = (ROOT / "README.md").read_text()
    assert "(docs/architecture.md)" in readme and "(docs/benchmarks.md)" in readme


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_stay_inside_the_repository(doc):
    text = doc.read_text()
    for bad in ("../shared", "/work/", "file://"):
        assert bad not in text, f"{doc.name} points outside the repository: {bad!r}"
    problems = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.is_relative_to(ROOT):
            problems.append(f"{target}: outside the repository")
        elif not dest.exists():
            problems.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            problems.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not problems, f"{doc.name}: " + "; ".join(problems)


def test_the_check_sees_a_broken_link():
    """Not vacuous: the link pattern finds relative links and the slug matches GitHub's."""
    assert LINK.findall("see [x](../shared/DESIGN.md) and [y](docs/a.md#b-c)") == [
        "../shared/DESIGN.md",
        "docs/a.md#b-c",
    ]
    assert _slug("Comm shapes: `direct`, `ring`, `plain`") == "comm-shapes-direct-ring-plain"


def test_readme_is_the_front_page():
    """README: at most 12 KB, the two commands first, then what it is, Install and the quickstarts; every page of
    docs/ reachable from it."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 12 * 1024, f"README.md is {len(readme.encode())} bytes (at most 12 KB)"
    lines = readme.splitlines()
    assert lines[0] == "# ringattn" and lines[2] == "```bash" and lines[3].startswith("make demo")
    assert lines[4].startswith("make test")
    order = [
        readme.index(h)
        for h in (
            "## Install",
            "## Quickstart: plain PyTorch",
            "## Quickstart: Hugging Face",
            "## Quickstart: Megatron",
            "## Supported versions",
            "## Documentation",
        )
    ]
    assert order == sorted(order)
    linked = {t.partition("#")[0] for t in LINK.findall(readme)}
    missing = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if f"docs/{p.name}" not in linked]
    assert not missing, f"docs pages the README does not link: {missing}"
