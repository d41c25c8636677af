"""What is derived from the mask tensors, and the one cache that keeps it for a forward pass.

Every layer of a model hands the op the same `key_padding_mask` and `is_global` tensors, so what is derived from
them is computed once per forward pass and reused by every layer and by the backward:

* `global_without_padding(glob, pad)`: `glob & ~pad`, one tensor object per pair of masks (a padding token is
  never global);
* `global_index(is_global)`: the compact index of each row's global tokens and its one host read;
* the backends' own tables (`backends/triton/launch.py`: token kinds, `backends/cpu.py`: block masks), built from
  the two above through `cached`.

The rule, stated once here for all of them: an entry is keyed on a namespace, the caller's extra key, whether
inference mode is on, and the *identity* of its source tensors; it holds those tensors by weak reference (it goes
away with them, so the cache never keeps a batch alive) and records their `_version` (an in-place edit of a mask
rebuilds it). Derived entries chain: the global index is keyed on the combined mask object, the backend tables on
the global index objects, so one new mask tensor invalidates everything built from it, and nothing else.

Inference mode. A value built under `torch.inference_mode()` is an inference tensor, which autograd cannot save:
it is only reused under inference mode (the mode is part of the key). A source that is itself an inference tensor
has no version counter, so an in-place edit of it could not be seen: such entries are kept only inside
`one_forward_pass()`, the scope of one model forward (the patched encoders open it, `hf/patching.py`), during which
no mask is edited, and dropped when it closes; outside it they are rebuilt on every call.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import torch

from .tracing import is_tracing


class TensorCache:
    """`get(sources, build, key)`: `build()`'s value, reused while the same `sources` tensors live unchanged."""

    def __init__(self) -> None:
        self._entries: dict[tuple, tuple[tuple[weakref.ref, ...], tuple[int, ...], Any]] = {}

    def get(self, sources: tuple[torch.Tensor, ...], build: Callable[[], Any], key: Hashable = ()) -> Any:
        full_key = (key, torch.is_inference_mode_enabled(), tuple(id(t) for t in sources))
        if any(t.is_inference() for t in sources):
            return _inference_entry(full_key, sources, build)
        versions = tuple(t._version for t in sources)
        hit = self._entries.get(full_key)
        if hit is not None and hit[1] == versions and all(r() is t for r, t in zip(hit[0], sources, strict=True)):
            return hit[2]
        value = build()
        entries = self._entries

        def evict(_, full_key=full_key):
            # Only while the entry still refers to a dead tensor: a newer entry under a reused id stays.
            entry = entries.get(full_key)
            if entry is not None and any(r() is None for r in entry[0]):
                del entries[full_key]

        self._entries[full_key] = (tuple(weakref.ref(t, evict) for t in sources), versions, value)
        return value


_CACHE = TensorCache()
# Entries whose sources are inference tensors, per open `one_forward_pass` scope (innermost last): key -> (sources,
# value); the sources are held strongly, for the scope's duration only.
_PASS_SCOPES: list[dict[tuple, tuple[tuple[torch.Tensor, ...], Any]]] = []


@contextlib.contextmanager
def one_forward_pass() -> Iterator[None]:
    """The scope of one model forward: masks that are inference tensors are cached too, until it closes."""
    _PASS_SCOPES.append({})
    try:
        yield
    finally:
        _PASS_SCOPES.pop()


def _inference_entry(full_key: tuple, sources: tuple[torch.Tensor, ...], build: Callable[[], Any]) -> Any:
    if not _PASS_SCOPES:
        return build()
    scope = _PASS_SCOPES[-1]
    hit = scope.get(full_key)
    if hit is not None and all(a is b for a, b in zip(hit[0], sources, strict=True)):
        return hit[1]
    value = build()
    scope[full_key] = (sources, value)
    return value


def cached(namespace: str, sources: tuple[torch.Tensor, ...], build: Callable[[], Any], key: Hashable = ()) -> Any:
    """`build()`, computed once while the `sources` tensors live unchanged (the rule of this module's docstring).
    `namespace` keeps the users of the one cache apart; `key` adds what else the value depends on. While a tracer
    runs (`torch.compile`, an exporter), `build()` every time: a value built before the trace is no function of the
    traced inputs, and the legacy ONNX exporter would bake it into the graph as a constant."""
    if is_tracing():
        return build()
    return _CACHE.get(sources, build, (namespace, key))


def global_without_padding(glob: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """`glob & ~pad`, the same tensor object for the same two masks, so that the global index cache hits and only
    the first layer of a model reads the global count back."""
    return cached("global_without_padding", (glob, pad), lambda: glob & ~pad)


def global_positions(is_global: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Compact global index: `(B, G)` int64 positions (increasing; entries past a row's count are arbitrary),
    `(B,)` int32 counts, and `G`, the largest count (one host read).

    A stable sort of "not global" puts each row's globals first, in increasing position.
    """
    counts = is_global.sum(dim=1, dtype=torch.int32)
    g = int(counts.max()) if is_global.numel() else 0
    order = torch.sort((~is_global).to(torch.int8), dim=1, stable=True).indices[:, :g]
    return order, counts, g


def global_index(is_global: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
    """`(global_idx (B, G) int32, global_count (B,) int32, G)` for a `(B, N)` bool mask; `(None, None, 0)` when no
    token is global. Cached per `is_global` tensor: every layer reuses one index without another host read."""
    if is_global is None:
        return None, None, 0

    def build():
        order, counts, g = global_positions(is_global)
        return (None, None, 0) if g == 0 else (order.to(torch.int32).contiguous(), counts, g)

    return cached("global_index", (is_global,), build)
