"""Per-object memory held by the module that uses it: values keyed by a live object's identity.

ringattn's derived state (a layout's plans, a plan's executor view, what the ranks already agreed on
for a layout, the layout a Megatron batch derived) belongs to the module that computes and reads it,
not to the object it is derived from: the objects stay plain frozen dataclasses, pickle without
knowing about any cache, and nobody writes attributes into another module's objects.

:class:`IdentityMemo` maps an object to a value by identity (``id``), so a lookup costs a dict access
whatever the object's size (hashing a layout would walk its documents on every call). It holds the
object weakly: an entry is dropped as soon as its object is collected, so the memory is bounded by
the objects the program keeps alive. A value must not refer back to its key object, or the entry
would keep the object alive.

>>> class Layout:                     # any object that supports weak references
...     pass
>>> memo = IdentityMemo("example")
>>> a = Layout()
>>> memo.get(a, lambda: [1, 2]) is memo.get(a, lambda: [3])   # built once, then the same value
True
>>> len(memo)
1
>>> del a                              # the entry goes with its object
>>> len(memo)
0
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["IdentityMemo"]

V = TypeVar("V")


class IdentityMemo(Generic[V]):
    """``object -> value``, by identity, holding the object weakly (see the module docstring)."""

    __slots__ = ("name", "_entries")

    def __init__(self, name: str) -> None:
        self.name = name
        self._entries: dict[int, tuple[weakref.ref, V]] = {}

    def get(self, obj: object, build: Callable[[], V]) -> V:
        """The value for ``obj``: ``build()`` on the first call for this live object, then the same value."""
        key = id(obj)
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is obj:
            return entry[1]
        value = build()
        self._entries[key] = (weakref.ref(obj, self._dropper(key)), value)
        return value

    def peek(self, obj: object) -> V | None:
        """The value for ``obj`` if one was built, else None (builds nothing)."""
        entry = self._entries.get(id(obj))
        return entry[1] if entry is not None and entry[0]() is obj else None

    def _dropper(self, key: int) -> Callable[[weakref.ref], None]:
        entries = self._entries

        def drop(ref: weakref.ref) -> None:
            entry = entries.get(key)
            if entry is not None and entry[0] is ref:  # not a newer object that reused the id
                del entries[key]

        return drop

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"IdentityMemo({self.name!r}, {len(self)} live objects)"
