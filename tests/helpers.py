"""What the tests share: one input builder, the names of the inputs that get a gradient, the error rule against the
reference, the check that an exported graph holds no `N x N` tensor, and where each backend runs here.

Imported as `from helpers import ...`: pytest's default ("prepend") import mode puts this directory on `sys.path`
before it imports a test module from it, and `conftest.py` puts it there under any import mode.

The error rule (`assert_matches_reference`): for the output and each input gradient, a fused backend's
result must be finite (outputs are NaN-poisoned before the kernels run, see the `poison_outputs` fixture, so
anything never written fails), present exactly where the reference's is, and within

    max |got - ref| <= 2 * max |base - ref| + atol * max(1, max |ref|)

of the float64 reference `ref` computed from the same (rounded) inputs, `base` being the same computation done by
PyTorch in the low-precision dtype. IEEE fp32 kernels have no baseline: fp32 against fp64 with the fp32 atol.
Padding rows of the output, and of the six `(B, N, H, D)` gradients, are exactly zero.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from unittest import mock

import pytest
import torch

import prefix_kernels as pk
from prefix_kernels.core import reference
from prefix_kernels.core.reference import dense_attention

# The repository's root (`tests/` sits in it): the benchmarks and examples some tests run.
ROOT = Path(__file__).resolve().parent.parent
# The inputs of `longformer_attention` that get a gradient, in the order of the fused ops' backward.
GRAD_NAMES = ("q", "k", "v", "q_global", "k_global", "v_global", "prefix_k", "prefix_v", "prefix_k_global",
              "prefix_v_global", "prefix_scale")
GLOBAL_NAMES = GRAD_NAMES[3:6]
# atol of the error rule, relative to max(1, |reference|): covers the rounding of results whose PyTorch baseline
# error happens to be ~0 (a few ulps of the dtype).
ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

Masks = dict[str, torch.Tensor]
Positions = Mapping[int, Sequence[int]]


# ------------------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------------------


def make_inputs(
    b: int,
    n: int,
    h: int,
    d: int,
    *,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    seed: int = 0,
    prefix: int = 0,
    batch_prefix: bool = False,
    strided: bool = False,
    global_projections: bool = True,
    n_global: tuple[int, int] | int | Positions | None = None,
    pad: int | Positions | None = None,
    empty_rows: Sequence[int] = (),
    mask_seed: int | None = None,
    requires_grad: bool = False,
    prefix_global: bool = False,
    prefix_scale: tuple[int, ...] | None = None,
    documents: Sequence[int] | Mapping[int, Sequence[int]] | None = None,
) -> tuple[dict[str, torch.Tensor], Masks]:
    """Random inputs of `longformer_attention`: `(tensors, masks)`.

    `tensors`: `q, k, v` and (unless `global_projections=False`) `q_global, k_global, v_global`, `(B, N, H, D)`;
    with `prefix=P`, `prefix_k, prefix_v`, `(P, H, D)` or with `batch_prefix` `(B, P, H, D)`. Standard normals drawn
    in float64 from a generator seeded with `seed` (the same values before rounding in every dtype and on every
    device), then cast to `dtype` on `device`, leaves with `requires_grad`. `strided`: `(B, H, N, D)` storage seen
    as `(B, N, H, D)`, as a head-major projection gives.

    `masks`: `{"is_global", "key_padding_mask"}`, `(B, N)` bool on `device`, each only when asked for:

    * `n_global`: `(lo, hi)`, a count per row drawn from the inclusive range, at random non-padding positions
      (rows may get none); an int `G`, the first `G` tokens of every row (prefix-propagation's layout);
      `{row: positions}`, exactly those. `None`: no `is_global`.
    * `pad`: an int, each row a random padded tail of up to that many tokens (never the whole row; 0 gives an
      all-False mask); `{row: positions}`, exactly those. `None`: no `key_padding_mask`.
    * `empty_rows`: rows made all padding and without global tokens (no query there has an admissible key).
    * `documents`: the lengths of consecutive documents, the same in every row (what is left after the last one is
      one more document), or `{row: lengths}`; gives `masks["document_ids"]` `(B, N)` int64.

    `prefix_global`: also `prefix_k_global, prefix_v_global`, shaped as the prefix; `prefix_scale`: the shape, `()`
    or `(H,)`, of a `prefix_scale` input (pass `prefix_normalization="separate"` to the call).

    Random masks come from a generator seeded with `mask_seed` (default `seed + 1`).
    """
    gen = torch.Generator().manual_seed(seed)
    shape = (b, h, n, d) if strided else (b, n, h, d)
    tensors = {}
    for name in GRAD_NAMES[:6]:
        t = torch.randn(*shape, generator=gen, dtype=torch.float64)
        tensors[name] = t.transpose(1, 2) if strided else t
    if prefix:
        prefix_shape = (b, prefix, h, d) if batch_prefix else (prefix, h, d)
        for name in ("prefix_k", "prefix_v"):
            tensors[name] = torch.randn(*prefix_shape, generator=gen, dtype=torch.float64)
    if prefix and prefix_global:
        for name in ("prefix_k_global", "prefix_v_global"):
            tensors[name] = torch.randn(*tensors["prefix_k"].shape, generator=gen, dtype=torch.float64)
    if prefix_scale is not None:
        tensors["prefix_scale"] = torch.randn(tuple(prefix_scale), generator=gen, dtype=torch.float64)
    if not global_projections:
        for name in GLOBAL_NAMES:
            del tensors[name]
    tensors = {k: t.to(device=device, dtype=dtype).requires_grad_(requires_grad) for k, t in tensors.items()}

    is_global = torch.zeros(b, n, dtype=torch.bool)
    padding = torch.zeros(b, n, dtype=torch.bool)
    if isinstance(n_global, tuple) or isinstance(pad, int):
        mask_gen = torch.Generator().manual_seed(seed + 1 if mask_seed is None else mask_seed)
        counts = n_global if isinstance(n_global, tuple) else (0, 0)
        _random_masks(is_global, padding, counts, pad if isinstance(pad, int) else 0, mask_gen)
    if isinstance(n_global, int):
        is_global[:, :n_global] = True
    elif isinstance(n_global, Mapping):
        for row, positions in n_global.items():
            is_global[row, list(positions)] = True
    if isinstance(pad, Mapping):
        for row, positions in pad.items():
            padding[row, list(positions)] = True
    for row in empty_rows:
        padding[row] = True
        is_global[row] = False
    masks = {}
    if n_global is not None:
        masks["is_global"] = is_global.to(device)
    if pad is not None or empty_rows:
        masks["key_padding_mask"] = padding.to(device)
    if documents is not None:
        masks["document_ids"] = _document_ids(b, n, documents).to(device)
    return tensors, masks


def _document_ids(b: int, n: int, documents) -> torch.Tensor:
    """`(B, N)` ids numbering consecutive runs of the given lengths (per row, or the same for every row)."""
    ids = torch.zeros(b, n, dtype=torch.long)
    for row in range(b):
        lengths = documents.get(row, ()) if isinstance(documents, Mapping) else documents
        start = 0
        for doc, length in enumerate(lengths):
            ids[row, start : start + length] = doc
            start += length
        ids[row, start:] = len(lengths)
    return ids


def _random_masks(is_global, pad, counts: tuple[int, int], pad_max: int, gen: torch.Generator) -> None:
    """Fills `(B, N)` `is_global` and `pad` in place: per row a random padded tail of up to `pad_max` tokens, then
    a random count in `counts` (inclusive) of global tokens among the others."""
    b, n = is_global.shape
    for i in range(b):
        tail = int(torch.randint(0, pad_max + 1, (1,), generator=gen)) if pad_max else 0
        tail = min(tail, n - 1)
        if tail:
            pad[i, n - tail :] = True
        count = int(torch.randint(counts[0], counts[1] + 1, (1,), generator=gen))
        count = min(count, n - tail)
        if count:
            is_global[i, torch.randperm(n - tail, generator=gen)[:count]] = True


def random_like(shape, *, seed: int, dtype: torch.dtype = torch.float64, device="cpu") -> torch.Tensor:
    """Standard normals of `shape` (an output gradient, a direction), drawn in float64 on the CPU from `seed`: the
    same values on every device."""
    t = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return t.to(device=device, dtype=dtype)


# ------------------------------------------------------------------------------------------------------------
# Running a backend, and the error rule
# ------------------------------------------------------------------------------------------------------------


def op(backend: str) -> Callable[..., torch.Tensor]:
    """`longformer_attention` with an explicit `backend` (so it fails loudly rather than falls back)."""
    return functools.partial(pk.longformer_attention, backend=backend)


def run_with_grads(fn, inputs: Mapping[str, torch.Tensor], masks: Masks, window: int, dtype: torch.dtype,
                   grad_out: torch.Tensor, **kwargs) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """`fn(**inputs, **masks, window=window, **kwargs)` on fresh leaves cast to `dtype`: the output and the
    gradients of the inputs in `GRAD_NAMES` order (`None` for an absent one) for the output gradient
    `grad_out` (moved to the output's device and dtype)."""
    leaves = {k: x.detach().to(dtype).requires_grad_() for k, x in inputs.items()}
    out = fn(**leaves, **masks, window=window, **kwargs)
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out.to(device=out.device, dtype=out.dtype),
                                allow_unused=True)
    # An input the result does not depend on (the global rows' prefix without global tokens): a zero gradient.
    named = {k: torch.zeros_like(leaves[k]) if g is None else g for k, g in zip(leaves, grads, strict=True)}
    return out, [named.get(name) for name in GRAD_NAMES]


def assert_matches_reference(got, ref, base=None, *, atol: float, key_padding_mask: torch.Tensor | None = None,
                             label: str = "") -> None:
    """The error rule of this module's docstring. `got`, `ref`, `base`: `(out, grads)` as `run_with_grads` gives
    them (`ref` in float64; `base`, the same-dtype PyTorch computation, or `None` for none)."""
    base_out, base_grads = base if base is not None else (None, [None] * len(GRAD_NAMES))
    rows = [("out", got[0], ref[0], base_out), *zip(GRAD_NAMES, got[1], ref[1], base_grads, strict=True)]
    for name, a, r, b in rows:
        where = f"{label} {name}".strip()
        assert (a is None) == (r is None), f"{where}: present {a is not None}, in the reference {r is not None}"
        if a is None:
            continue
        assert a.shape == r.shape, f"{where}: shape {tuple(a.shape)}, reference {tuple(r.shape)}"
        assert torch.isfinite(a).all(), f"{where}: non-finite (never written, or NaN)"
        scale = max(1.0, r.abs().max().item()) if r.numel() else 1.0
        err = (a.double() - r).abs().max().item() if r.numel() else 0.0
        base_err = 0.0 if b is None or not r.numel() else (b.double() - r).abs().max().item()
        assert err <= 2 * base_err + atol * scale, f"{where}: error {err:.3g}, same-dtype PyTorch {base_err:.3g}"
    if key_padding_mask is not None:
        assert (got[0][key_padding_mask] == 0).all(), f"{label} out: padding rows not zero".strip()
        for name, g in zip(GRAD_NAMES[:6], got[1][:6], strict=True):
            if g is not None:
                # Padding queries and keys get no gradient.
                assert (g[key_padding_mask] == 0).all(), f"{label} {name}: padding rows not zero".strip()


def assert_close_scaled(got: torch.Tensor, want: torch.Tensor, tol: float, msg: str = "") -> None:
    """`got` within `tol * max(1, max |want|)` of `want`, element by element (two computations of one result in
    the same dtype, e.g. a patched model against Hugging Face's)."""
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(got, want, atol=tol * scale, rtol=0, msg=(lambda m: f"{msg}: {m}") if msg else None)


def _fp32_masked_softmax(scores, allowed, _masked_softmax=reference.masked_softmax):
    return _masked_softmax(scores.float(), allowed).to(scores.dtype)


def dense_in_dtype(**kw):
    """The same computation done by PyTorch in the input dtype: the dense reference with its matmuls in that
    dtype and its softmax in fp32 (as Hugging Face's eager attention computes on a CPU)."""
    with mock.patch.object(reference, "_compute_dtype", lambda dtype: dtype), \
            mock.patch.object(reference, "masked_softmax", _fp32_masked_softmax):
        return dense_attention(**kw)


def check_against_reference(fn, inputs: Mapping[str, torch.Tensor], masks: Masks, window: int, dtype: torch.dtype,
                            grad_out: torch.Tensor, *, reference=dense_attention, baseline="auto",
                            atol: float | None = None, label: str = "", **kwargs):
    """Runs `fn` (e.g. `op("triton")`) in `dtype` and holds its output and gradients to the error rule;
    returns `(out, grads)`.

    The inputs and `grad_out` (moved to the inputs' device) are first rounded to `dtype`, so every computation
    starts from the same values.
    `reference` (`dense_attention`, or a chunked one for long sequences) runs in float64. `baseline`: `"auto"` is
    `reference` run in `dtype` for fp16 / bf16 and none for fp32 (IEEE kernels against fp64 with the fp32 atol
    alone); a callable runs that in `dtype` (e.g. the reference under TF32 matmuls, or with its matmuls in the
    low-precision dtype); `None` is none. `atol` defaults to `ATOL[dtype]`. `kwargs` go to every call (e.g.
    `dropout_p`).
    """
    inputs = {k: x.detach().to(dtype) for k, x in inputs.items()}
    grad_out = grad_out.to(device=inputs["q"].device, dtype=dtype)
    got = run_with_grads(fn, inputs, masks, window, dtype, grad_out, **kwargs)
    ref = run_with_grads(reference, inputs, masks, window, torch.float64, grad_out, **kwargs)
    if baseline == "auto":
        baseline = None if dtype == torch.float32 else reference
    base = None if baseline is None else run_with_grads(baseline, inputs, masks, window, dtype, grad_out, **kwargs)
    assert got[0].dtype == dtype, f"{label} out: dtype {got[0].dtype}, expected {dtype}".strip()
    assert_matches_reference(got, ref, base, atol=ATOL[dtype] if atol is None else atol,
                             key_padding_mask=masks.get("key_padding_mask"), label=label)
    return got


# ------------------------------------------------------------------------------------------------------------
# Exported graphs
# ------------------------------------------------------------------------------------------------------------


def assert_no_square_tensor(program, length_input: str) -> None:
    """For a `torch.export.ExportedProgram` traced with a dynamic length (dimension 1 of the input named
    `length_input`): no value of the graph has two dimensions that grow with the length (an `N x N` tensor, whatever
    the length), and every call is an ATen op, `getitem` or arithmetic on sizes."""
    import operator

    placeholder = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == length_input)
    symbols = placeholder.meta["val"].shape[1].node.expr.free_symbols
    for node in program.graph.nodes:
        if node.op == "call_function":
            target = node.target
            standard = isinstance(target, torch._ops.OpOverload) and target.namespace == "aten"
            assert standard or target is operator.getitem or target.__module__ in ("_operator", "torch"), target
        vals = node.meta.get("val")
        for val in vals if isinstance(vals, (tuple, list)) else (vals,):
            if isinstance(val, torch.Tensor):
                grows = [s for s in val.shape if isinstance(s, torch.SymInt) and s.node.expr.free_symbols & symbols]
                assert len(grows) <= 1, f"{node.format_node()}: shape {tuple(val.shape)} grows with N twice"


# ------------------------------------------------------------------------------------------------------------
# Where each backend runs here
# ------------------------------------------------------------------------------------------------------------


def triton_interpreted() -> bool:
    """Whether the Triton kernels run in Triton's CPU interpreter in this process (`conftest.py` sets
    `TRITON_INTERPRET=1` when there is no CUDA device)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def cannot_run(backend: str, device: str) -> str | None:
    """Why `backend` cannot run on `device` tensors here (`None` if it can); no CUDA context is created. Tests call
    it (through `skip_unless_runs`) when they run, for the finer reasons: the GPU gate itself is the `gpu` marker,
    which `conftest.py` turns into a skip without a CUDA device."""
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    if backend == "reference":
        return None
    if backend == "cpu":
        return None if device == "cpu" else "the cpu backend takes CPU tensors"
    why = pk.available_backends()[backend]
    if why is not None:
        return f"backend {backend!r} unavailable: {why}"
    if backend == "triton":
        if device == "cpu" and not triton_interpreted():
            return ("the Triton kernels are compiled for the GPU in this process (TRITON_INTERPRET is unset, as "
                    "conftest.py leaves it where CUDA is): they take CUDA tensors")
        if device == "cuda" and triton_interpreted():
            return "TRITON_INTERPRET=1: the Triton interpreter takes CPU tensors only"
    if backend == "cuda" and device != "cuda":
        return "the cuda backend takes CUDA tensors"
    return None


def skip_unless_runs(backend: str, device: str) -> None:
    """Skips the calling test, with the reason, when `backend` cannot run on `device` tensors here."""
    why = cannot_run(backend, device)
    if why is not None:
        pytest.skip(why)


# `(backend, device)` of the fused kernels, for `pytest.mark.parametrize("backend,device", FUSED)`: the Triton
# kernels on CPU tensors (its interpreter, where there is no CUDA) and on CUDA tensors (compiled), the CUDA library
# on CUDA tensors (those marked `gpu`). Tests call `skip_unless_runs(backend, device)`, so the cases that cannot
# run here say why.
FUSED = (pytest.param("triton", "cpu", id="triton-cpu-interpreter"),
         pytest.param("triton", "cuda", id="triton-cuda", marks=pytest.mark.gpu),
         pytest.param("cuda", "cuda", id="cuda-cuda", marks=pytest.mark.gpu))


def exact_or_atomic(device) -> dict:
    """`assert_close` tolerances for two fp32 runs that should agree: exact on the CPU; on a GPU the Triton backward
    sums dQ with fp32 atomics, whose order (so the last bits) varies from run to run. A different dropout mask or
    a missed term changes results by far more."""
    return dict(rtol=0, atol=0) if torch.device(device).type == "cpu" else dict(rtol=1e-5, atol=1e-6)
