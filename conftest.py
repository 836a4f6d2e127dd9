"""Root pytest configuration: the doctests of optional adapters need their framework.

``make test`` installs megatron-core, transformers, accelerate and trl, so CI runs every doctest; without an
extra, the adapter module is not collected (its tests skip the same way, see ``tests/test_megatron.py``).
"""

from __future__ import annotations

import importlib.util

collect_ignore = [
    path
    for path, packages in (
        ("ringattn/adapters/megatron.py", ("megatron",)),
        ("ringattn/adapters/transformers", ("transformers",)),
        ("ringattn/adapters/trainer.py", ("transformers", "accelerate", "trl")),
    )
    if any(importlib.util.find_spec(package) is None for package in packages)
]
