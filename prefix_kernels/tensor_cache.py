"""One cache for values derived from mask tensors, shared by the dispatch checks, the custom op and the backends.

Every layer of a model hands the op the same mask tensors, so what is derived from them (the combined global mask,
the compact global index and its one host read, the backends' token tables and block masks) is computed once per
forward pass. An entry is keyed on the identity of its source tensors, holds them by weak reference (it goes away
with them, so a cache never keeps a batch alive) and records their `_version` (an in-place edit of a mask
rebuilds it).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from typing import Any

import torch


class TensorCache:
    """`get(sources, build, extra)`: `build()`'s value, reused while the same `sources` tensors live unchanged."""

    def __init__(self) -> None:
        self._entries: dict[tuple, tuple[tuple[weakref.ref, ...], tuple[int, ...], Any]] = {}

    def get(self, sources: tuple[torch.Tensor, ...], build: Callable[[], Any], extra: Hashable = ()) -> Any:
        key = (extra, tuple(id(t) for t in sources))
        versions = tuple(t._version for t in sources)
        hit = self._entries.get(key)
        if hit is not None and hit[1] == versions and all(r() is t for r, t in zip(hit[0], sources, strict=True)):
            return hit[2]
        value = build()
        entries = self._entries

        def evict(_, key=key):
            # Only while the entry still refers to a dead tensor: a newer entry under a reused id stays.
            entry = entries.get(key)
            if entry is not None and any(r() is None for r in entry[0]):
                del entries[key]

        self._entries[key] = (tuple(weakref.ref(t, evict) for t in sources), versions, value)
        return value
