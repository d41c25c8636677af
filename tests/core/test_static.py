"""`core/static.py`: the formulation the exporters trace, against the dense reference in float64 (exact up to
rounding) on random and edge-case masks, and the op exported by `torch.export` with a dynamic batch size and
length. Its export with whole models is in `hf/test_export.py`.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_no_square_tensor, make_inputs
from oracle import row_oracle

import prefix_kernels as pk
from prefix_kernels.core.checks import check_inputs
from prefix_kernels.core.reference import chunked_attention, dense_attention
from prefix_kernels.core.static import block_size, static_attention

# (N, window, chunk): one block or many, a block larger than the input, a chunk that does not divide the window
# (several key blocks on each side), window 0 (the diagonal), a window wider than the input, one token.
SHAPES = [(37, 3, None), (100, 8, None), (5, 4, None), (64, 40, None), (50, 7, 3), (29, 0, None), (40, 0, 4),
          (23, 30, 5), (1, 4, None), (70, 64, None), (45, 9, 16)]


@pytest.mark.parametrize("n, window, chunk", SHAPES)
@pytest.mark.parametrize("seed", range(3))
def test_static_attention_matches_the_dense_reference(n, window, chunk, seed):
    """Random masks: different global counts per row (none in some), padded tails, a batch-wide prefix or one per
    row; seed 2 without any global token."""
    b, h, d = 3, 2, 8
    x, masks = make_inputs(b, n, h, d, dtype=torch.float64, seed=seed, prefix=(0, 3, 2)[seed],
                           batch_prefix=seed == 1, n_global=(0, 5), pad=n // 3, mask_seed=seed + n)
    glob, pad = masks["is_global"], masks["key_padding_mask"]
    if seed == 2:
        glob = None
        for name in ("q_global", "k_global", "v_global"):
            x.pop(name)
    kwargs = dict(window=window, is_global=glob, key_padding_mask=pad, **x)
    got = static_attention(check_inputs(**kwargs), chunk=chunk)
    torch.testing.assert_close(got, dense_attention(**kwargs), atol=1e-12, rtol=0)


@pytest.mark.parametrize("case", ["edges", "all_global", "empty_rows", "local_rows_only"])
def test_static_attention_edge_masks(case):
    """Globals at both ends and next to padding, every token global, rows of padding only (output 0, never NaN),
    and the local rows alone (global rows 0) against the chunked reference."""
    b, n, h, d, window = 3, 41, 2, 8, 6
    globals_at = {0: [0, n - 1], 1: [0, 1, 2, 25], 2: [n - 12]}
    pad = {1: range(26, n), 2: range(n - 11, n)}
    x, masks = make_inputs(b, n, h, d, dtype=torch.float64, prefix=2, n_global=globals_at, pad=pad)
    glob, padding = masks["is_global"], masks["key_padding_mask"]
    if case == "all_global":
        glob = ~padding
    if case == "empty_rows":
        padding[0] = True
        glob = glob & ~padding
    kwargs = dict(window=window, is_global=glob, key_padding_mask=padding, **x)
    if case == "local_rows_only":
        for name in ("q_global", "k_global", "v_global"):
            kwargs.pop(name)
        args = check_inputs(**kwargs, local_rows_only=True)
        torch.testing.assert_close(static_attention(args), chunked_attention(args), atol=1e-12, rtol=0)
        return
    out = static_attention(check_inputs(**kwargs))
    assert not out.isnan().any()
    assert (out[padding] == 0).all()
    torch.testing.assert_close(out, dense_attention(**kwargs), atol=1e-12, rtol=0)


def test_static_attention_empty_and_padding_rows_are_zero():
    """Window 0 and every other key padding or global-only: rows with no admissible key give 0, never NaN; padding
    rows 0; gradients finite."""
    b, n, h, d = 2, 12, 2, 4
    x, _ = make_inputs(b, n, h, d, requires_grad=True)
    pad = torch.zeros(b, n, dtype=torch.bool)
    pad[:, 1::2] = True
    pad[1] = True  # a row of padding only
    glob = torch.zeros(b, n, dtype=torch.bool)
    args = check_inputs(**x, window=0, is_global=glob, key_padding_mask=pad)
    out = static_attention(args)
    assert not out.isnan().any()
    assert (out[pad] == 0).all()
    torch.testing.assert_close(out, dense_attention(**x, window=0, is_global=glob, key_padding_mask=pad))
    out.sum().backward()
    assert all(t.grad is not None and t.grad.isfinite().all() for t in x.values())


# (N, window, chunk, documents): documents shorter and longer than a block and than the window, a one-token
# document, a chunk that does not divide the window.
NEW_ARGS_SHAPES = [(37, 3, None, [5, 1, 20]), (50, 7, 3, [12, 12]), (70, 64, None, [30, 25]), (41, 9, 16, [1, 2, 7])]


@pytest.mark.parametrize("n, window, chunk, documents", NEW_ARGS_SHAPES)
@pytest.mark.parametrize("normalization", ["joint", "separate"])
def test_static_attention_new_arguments(n, window, chunk, documents, normalization):
    """`prefix_k_global` / `prefix_v_global`, `document_ids` (windows and global tokens within a document, the
    prefix shared) and both normalizations (`A + prefix_scale[h] * B` separately) against the dense reference and the
    row-by-row oracle, in float64, with the prefix_scale's gradient; then the local rows alone."""
    b, h, d = 3, 2, 8
    separate = normalization == "separate"
    x, masks = make_inputs(b, n, h, d, dtype=torch.float64, seed=n, prefix=3, batch_prefix=window % 2 == 1,
                           n_global=(0, 5), pad=n // 4, prefix_global=True, prefix_scale=(h,) if separate else None,
                           documents=documents, requires_grad=True)
    kwargs = dict(window=window, prefix_normalization=normalization, **masks, **x)
    got = static_attention(check_inputs(**kwargs), chunk=chunk)
    assert not got.isnan().any()
    want = dense_attention(**kwargs)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    torch.testing.assert_close(got, row_oracle(**kwargs).to(got.dtype), atol=1e-12, rtol=0)
    grads = torch.autograd.grad(got.sum(), list(x.values()))
    wants = torch.autograd.grad(want.sum(), list(x.values()))
    for name, g, g_want in zip(x, grads, wants, strict=True):
        torch.testing.assert_close(g, g_want, atol=1e-10, rtol=0, msg=name)
    for name in ("q_global", "k_global", "v_global", "prefix_k_global", "prefix_v_global"):
        kwargs.pop(name)
    args = check_inputs(**kwargs, local_rows_only=True)
    torch.testing.assert_close(static_attention(args, chunk=chunk), chunked_attention(args), atol=1e-12, rtol=0)


def test_block_size():
    assert [block_size(w) for w in (0, 4, 63, 64, 256)] == [32, 32, 32, 32, 128]


class TwoWindows(torch.nn.Module):
    """The op at two windows (one key block on each side, and three: `c = 35` for `w = 70`), global tokens, padding
    and a prefix: plain tensors in and out."""

    def forward(self, q, k, v, is_global, key_padding_mask, prefix_k, prefix_v):
        kwargs = dict(is_global=is_global, key_padding_mask=key_padding_mask, q_global=v, k_global=q, v_global=k,
                      prefix_k=prefix_k, prefix_v=prefix_v)
        return pk.longformer_attention(q, k, v, window=4, **kwargs) + pk.longformer_attention(
            q, k, v, window=70, **kwargs)


def op_inputs(b: int, n: int, seed: int, globals_per_row: int) -> tuple:
    x, masks = make_inputs(b, n, 2, 8, seed=seed, prefix=3, n_global=(1, globals_per_row), pad=n // 4)
    return (x["q"], x["k"], x["v"], masks["is_global"], masks["key_padding_mask"], x["prefix_k"], x["prefix_v"])


def test_op_exported_with_dynamic_batch_and_length():
    """`torch.export` with a named `Dim` for the batch and the length (no guard on either), run at other sizes and
    with more global tokens than traced; no value of the graph grows with N in two dimensions."""
    model = TwoWindows()
    example = op_inputs(2, 45, 0, 2)
    batch_dim, length = torch.export.Dim("batch", min=1, max=16), torch.export.Dim("n", min=2, max=4096)
    dims = ({0: batch_dim, 1: length},) * 5 + (None, None)
    program = torch.export.export(model, example, dynamic_shapes=dims)
    assert_no_square_tensor(program, "q")
    run = program.module()
    for args in (example, op_inputs(3, 45, 1, 9), op_inputs(1, 200, 2, 20), op_inputs(4, 7, 3, 3)):
        torch.testing.assert_close(run(*args), model(*args), atol=1e-5, rtol=0)


class NewArguments(torch.nn.Module):
    """The op with packed documents, `prefix_k_global` / `prefix_v_global`, global tokens and padding, the prefix
    normalized jointly plus normalized separately (a `prefix_scale` per head): plain tensors in and out."""

    def forward(self, q, k, v, is_global, key_padding_mask, document_ids, prefix_k, prefix_v, prefix_k_global,
                prefix_v_global, prefix_scale):
        kwargs = dict(window=6, is_global=is_global, key_padding_mask=key_padding_mask, q_global=v, k_global=q,
                      v_global=k, prefix_k=prefix_k, prefix_v=prefix_v, prefix_k_global=prefix_k_global,
                      prefix_v_global=prefix_v_global, document_ids=document_ids)
        return pk.longformer_attention(q, k, v, **kwargs) + pk.longformer_attention(
            q, k, v, prefix_normalization="separate", prefix_scale=prefix_scale, **kwargs)


def new_arguments_inputs(b: int, n: int, seed: int, globals_per_row: int, documents: list[int]) -> tuple:
    x, masks = make_inputs(b, n, 2, 8, seed=seed, prefix=3, n_global=(1, globals_per_row), pad=n // 4,
                           prefix_global=True, prefix_scale=(2,), documents=documents)
    return (x["q"], x["k"], x["v"], masks["is_global"], masks["key_padding_mask"], masks["document_ids"],
            *(x[name] for name in ("prefix_k", "prefix_v", "prefix_k_global", "prefix_v_global", "prefix_scale")))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the legacy exporter says it is deprecated
def test_op_new_arguments_exported(tmp_path):
    """The op's new arguments through `torch.export` (dynamic batch and length, no value growing with N twice) and
    both ONNX exporters (the legacy one with `dynamic_axes`, the dynamo one with `dynamic_shapes`) in onnxruntime,
    run at other sizes, document layouts and global counts than traced."""
    model = NewArguments()
    example = new_arguments_inputs(2, 40, 0, 2, [10, 15])
    others = [new_arguments_inputs(3, 40, 1, 6, [3, 30]), new_arguments_inputs(1, 90, 2, 9, [20, 1, 40]),
              new_arguments_inputs(2, 9, 3, 3, [])]
    batch_dim, length = torch.export.Dim("batch", min=1, max=16), torch.export.Dim("n", min=2, max=4096)
    dims = ({0: batch_dim, 1: length},) * 6 + (None,) * 5
    program = torch.export.export(model, example, dynamic_shapes=dims)
    assert_no_square_tensor(program, "q")
    run = program.module()
    for args in (example, *others):
        torch.testing.assert_close(run(*args), model(*args), atol=1e-5, rtol=0)

    onnxruntime = pytest.importorskip("onnxruntime")
    names = ["q", "k", "v", "is_global", "key_padding_mask", "document_ids", "prefix_k", "prefix_v",
             "prefix_k_global", "prefix_v_global", "prefix_scale"]
    legacy, dynamo = tmp_path / "legacy.onnx", tmp_path / "dynamo.onnx"
    torch.onnx.export(model, example, str(legacy), dynamo=False, input_names=names,
                      dynamic_axes={name: {0: "batch", 1: "n"} for name in names[:6]})
    pytest.importorskip("onnxscript")
    torch.onnx.export(model, example, str(dynamo), dynamo=True, input_names=names, dynamic_shapes=dims)
    for path in (legacy, dynamo):
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for args in (example, *others):
            got = session.run(None, {name: t.numpy() for name, t in zip(names, args, strict=True)})[0]
            torch.testing.assert_close(torch.from_numpy(got), model(*args), atol=1e-5, rtol=0, msg=path.stem)
