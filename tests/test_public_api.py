"""The public surface: its names, and type hints on every parameter and return value that resolve to real types.

Public: the names in ``ringattn.__all__`` and the adapters' ``__all__`` (functions, classes, their public methods
and properties). Names imported only for type checking (``if TYPE_CHECKING:`` in ``ringattn.layout``, which
sits before ``plan`` and ``cost`` in the data flow) are resolved from those modules.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import typing

import pytest

import ringattn
import ringattn.cost
import ringattn.plan

#: ``ringattn.__all__`` of 0.1.0 plus hybrid CP (``CPGroups``, ``new_cp_groups``); change it only on purpose
PUBLIC = [
    "DocLayout",
    "RingEoDAttention",
    "ring_eod_attention",
    "eod_metadata",
    "EodMetadata",
    "build_plan",
    "rank_plan",
    "CPGroups",
    "new_cp_groups",
]

ADAPTERS = [
    ("ringattn.adapters.megatron", "megatron.core"),
    ("ringattn.adapters.transformers", "transformers"),
    ("ringattn.adapters.trainer", "trl"),
]

#: type-checking-only names, resolved from the modules that define them
TYPE_ONLY = {name: getattr(mod, name) for mod in (ringattn.plan, ringattn.cost) for name in mod.__all__}


def test_public_names_unchanged():
    assert ringattn.__all__ == PUBLIC
    for name in PUBLIC:
        assert getattr(ringattn, name) is not None


def _callables(obj):
    """``(qualified name, function)`` of ``obj`` and, for a class, its own public methods and properties."""
    if inspect.isfunction(obj):
        yield obj.__qualname__, obj
        return
    if not inspect.isclass(obj):
        return
    for name, member in vars(obj).items():
        if name.startswith("_") and name != "__init__":
            continue
        if isinstance(member, (classmethod, staticmethod)):
            member = member.__func__
        elif isinstance(member, property):
            member = member.fget
        if inspect.isfunction(member) and member.__module__ == obj.__module__:
            yield f"{obj.__qualname__}.{name}", member


def _unannotated(fn) -> list[str]:
    missing = []
    for i, (name, p) in enumerate(inspect.signature(fn).parameters.items()):
        if i == 0 and name in ("self", "cls"):
            continue
        if p.annotation is inspect.Parameter.empty:
            missing.append(name)
    if inspect.signature(fn).return_annotation is inspect.Signature.empty:
        missing.append("return")
    return missing


def _check(module_name: str, names: list[str]) -> list[str]:
    module = importlib.import_module(module_name)
    problems = []
    for name in names:
        obj = getattr(module, name)
        if inspect.isclass(obj) and dataclasses.is_dataclass(obj):
            typing.get_type_hints(obj, localns=TYPE_ONLY)  # every field's annotation resolves
        for qualname, fn in _callables(obj):
            missing = _unannotated(fn)
            if missing:
                problems.append(f"{module_name}.{qualname}: no annotation for {missing}")
            try:
                typing.get_type_hints(fn, localns=TYPE_ONLY)
            except Exception as exc:  # noqa: BLE001 - report which hint does not resolve
                problems.append(f"{module_name}.{qualname}: {type(exc).__name__}: {exc}")
    return problems


def test_public_surface_is_fully_annotated():
    problems = []
    for name in PUBLIC:  # where each public object is defined
        obj = getattr(ringattn, name)
        problems += _check(obj.__module__, [name])
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("module_name, needs", ADAPTERS)
def test_adapters_public_functions_are_fully_annotated(module_name, needs):
    pytest.importorskip(needs)
    module = importlib.import_module(module_name)
    names = [n for n in module.__all__ if inspect.isfunction(getattr(module, n)) or inspect.isclass(getattr(module, n))]
    assert len(names) >= 5
    problems = _check(module_name, names)
    assert not problems, "\n".join(problems)


def test_the_check_finds_a_missing_annotation():
    """The checker is not vacuous."""

    def untyped(a, b: int):
        return a

    assert _unannotated(untyped) == ["a", "return"]
