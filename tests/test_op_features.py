"""The op's three newer features against a second, row-by-row statement (`oracle.py`), with hypothesis:
`prefix_k_global` / `prefix_v_global` (the global rows' own prefix), `prefix_normalization="separate"` with its
differentiable `prefix_scale`, and `document_ids` (packed documents).

Random shapes, windows (0 to past N), global tokens (anywhere, at document edges, a different count per row),
padding after the last document, one-token documents, prefixes shared or per batch row, both normalizations; output
and every gradient (`prefix_scale`'s included) for the reference (fp64, fp32) and the `cpu` backend (fp32, bf16
against twice PyTorch's own bf16 error), dropout replayed from the `cpu` backend's documented masks, and without
dropout each document of a packed row equal to the document run alone. The Triton kernels' cases join here when
they serve these features (until then they decline them, which `test_the_fused_backends_say_why` checks).
"""

from __future__ import annotations

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from dropout_masks import cpu_keep_masks, philox_keep  # noqa: E402
from helpers import (  # noqa: E402
    check_against_reference,
    dense_in_dtype,
    make_inputs,
    op,
    random_like,
    run_with_grads,
)
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from oracle import row_oracle  # noqa: E402

import prefix_kernels as pk  # noqa: E402
from prefix_kernels.core.checks import check_inputs  # noqa: E402
from prefix_kernels.core.reference import chunked_attention, dense_attention  # noqa: E402

SHARED_FIXTURES = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]


@st.composite
def problems(draw, max_n=40, head_dims=(1, 3, 8)):
    """`(inputs, masks, window, kwargs)`: float64 inputs with at least one prefix key, documents, globals, padding
    after the last document, and the two normalizations."""
    b = draw(st.integers(1, 2))
    n = draw(st.integers(1, max_n))
    h = draw(st.integers(1, 2))
    d = draw(st.sampled_from(head_dims))
    separate = draw(st.booleans())
    lengths = draw(st.lists(st.integers(1, max(1, n // 2)), min_size=0, max_size=4))
    seed = draw(st.integers(0, 2**31 - 1))
    inputs, masks = make_inputs(
        b, n, h, d, dtype=torch.float64, seed=seed, prefix=draw(st.integers(1, 3)),
        batch_prefix=draw(st.booleans()), prefix_global=draw(st.booleans()),
        prefix_scale=draw(st.sampled_from([(), (h,)])) if separate else None,
        n_global=(0, 3), pad=draw(st.integers(0, n)), documents=lengths)
    if draw(st.booleans()) and lengths:  # globals at document edges: the first and last token of each
        starts = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
        edges = torch.cat([starts, starts - 1]).clamp(0, n - 1)
        masks["is_global"][:, edges] = True
        masks["is_global"] &= ~masks["key_padding_mask"]
    kwargs = {"prefix_normalization": "separate"} if separate else {}
    return inputs, masks, draw(st.integers(0, n + 2)), kwargs


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems(), chunk=st.integers(1, 20))
def test_reference_fp64_equals_the_row_statement(problem, chunk):
    inputs, masks, window, kwargs = problem
    chunked = lambda **kw: chunked_attention(check_inputs(**kw), chunk=chunk)  # noqa: E731
    check_against_reference(chunked, inputs, masks, window, torch.float64, random_like(inputs["q"].shape, seed=1),
                            reference=row_oracle, baseline=None, atol=1e-10, **kwargs)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems())
def test_reference_backend_fp32(problem):
    inputs, masks, window, kwargs = problem
    check_against_reference(op("reference"), inputs, masks, window, torch.float32,
                            random_like(inputs["q"].shape, seed=2), reference=row_oracle, **kwargs)


@pytest.mark.usefixtures("poison_outputs")
@settings(max_examples=40, deadline=None, suppress_health_check=SHARED_FIXTURES)
@given(problem=problems(max_n=60, head_dims=(4, 8)))
def test_cpu_backend_fp32(problem):
    inputs, masks, window, kwargs = problem
    check_against_reference(op("cpu"), inputs, masks, window, torch.float32, random_like(inputs["q"].shape, seed=3),
                            reference=row_oracle, atol=1e-5, **kwargs)


@pytest.mark.usefixtures("poison_outputs")
@settings(max_examples=15, deadline=None, suppress_health_check=SHARED_FIXTURES)
@given(problem=problems(max_n=60, head_dims=(8, 16)))
def test_cpu_backend_bf16_within_twice_pytorch_bf16(problem):
    inputs, masks, window, kwargs = problem
    check_against_reference(op("cpu"), inputs, masks, window, torch.bfloat16, random_like(inputs["q"].shape, seed=4),
                            reference=row_oracle, baseline=dense_in_dtype, **kwargs)


@pytest.mark.usefixtures("poison_outputs")
@settings(max_examples=10, deadline=None, suppress_health_check=SHARED_FIXTURES)
@given(problem=problems(max_n=40, head_dims=(4,)), p=st.sampled_from([0.2, 0.5]))
def test_cpu_backend_dropout_replays_its_documented_masks(problem, p):
    """The forward's masks (rebuilt from the documented scheme) reach the backward: output and every gradient are
    the row statement's with those masks on each probability matrix."""
    inputs, masks, window, kwargs = problem
    torch.manual_seed(7)
    seed = int(torch.randint(2**31, 2**62, (), dtype=torch.int64))  # what the op draws after manual_seed(7)
    x32 = {k: t.float() for k, t in inputs.items()}
    keep = cpu_keep_masks(x32, {"is_global": masks.get("is_global")}, window, p, seed)
    oracle = lambda **kw: row_oracle(**kw, keep=keep)  # noqa: E731
    torch.manual_seed(7)
    check_against_reference(op("cpu"), inputs, masks, window, torch.float32, random_like(inputs["q"].shape, seed=5),
                            reference=oracle, atol=1e-5, dropout_p=p, **kwargs)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@settings(max_examples=15, deadline=None, suppress_health_check=SHARED_FIXTURES)
@given(problem=problems(max_n=48, head_dims=(4,)))
def test_a_packed_row_equals_each_document_alone(backend, problem):
    """Without dropout, every document's rows (output and the gradients of its tokens) are what the document gives
    run alone, with its own global tokens; the shared prefix's gradient is the sum over the documents."""
    inputs, masks, window, kwargs = problem
    b, n = inputs["q"].shape[:2]
    grad_out = random_like(inputs["q"].shape, seed=6)
    packed = run_with_grads(op(backend), inputs, masks, window, torch.float32, grad_out, **kwargs)
    ids = masks["document_ids"]
    for row in range(b):
        for doc in ids[row].unique().tolist():
            cols = (ids[row] == doc).nonzero()[:, 0]
            lo, hi = int(cols[0]), int(cols[-1]) + 1
            # Token tensors by name, not by shape (a prefix of P = N keys is no token tensor).
            alone_in = {k: (t[row : row + 1, lo:hi] if not k.startswith("prefix") else
                            t[row : row + 1] if t.dim() == 4 else t) for k, t in inputs.items()}
            alone_masks = {k: t[row : row + 1, lo:hi] for k, t in masks.items() if k != "document_ids"}
            alone = run_with_grads(op(backend), alone_in, alone_masks, window, torch.float32,
                                   grad_out[row : row + 1, lo:hi], **kwargs)
            torch.testing.assert_close(packed[0][row, lo:hi], alone[0][0], atol=1e-5, rtol=1e-5)
            for name, (g_packed, g_alone) in zip(("q", "k", "v", "q_global", "k_global", "v_global"),
                                                zip(packed[1][:6], alone[1][:6], strict=True), strict=True):
                if g_packed is not None:
                    torch.testing.assert_close(g_packed[row, lo:hi], g_alone[0], atol=1e-5, rtol=1e-5, msg=name)


def test_the_arguments_are_checked():
    x, masks = make_inputs(1, 12, 2, 4, prefix=2, n_global={0: [0]})
    with pytest.raises(ValueError, match="needs prefix keys"):
        pk.longformer_attention(x["q"], x["k"], x["v"], window=2, prefix_normalization="separate",
                                prefix_scale=torch.ones(()))
    with pytest.raises(ValueError, match="prefix_normalization must be"):
        pk.longformer_attention(**x, **masks, window=2, prefix_normalization="kernel")
    with pytest.raises(ValueError, match="prefix_scale goes with"):
        pk.longformer_attention(**x, **masks, window=2, prefix_scale=torch.ones(()))
    with pytest.raises(ValueError, match="prefix_scale goes with"):
        pk.longformer_attention(**x, **masks, window=2, prefix_normalization="separate")
    with pytest.raises(ValueError, match=r"prefix_scale must have shape \(\) or \(H,\)"):
        pk.longformer_attention(**x, **masks, window=2, prefix_normalization="separate", prefix_scale=torch.ones(3))
    with pytest.raises(ValueError, match="prefix_k_global missing|prefix_v_global missing"):
        pk.longformer_attention(**x, **masks, window=2, prefix_k_global=x["prefix_k"])
    with pytest.raises(ValueError, match="prefix_k_global / prefix_v_global need"):
        pk.longformer_attention(**x, **masks, window=2, prefix_k_global=x["prefix_k"][:1],
                                prefix_v_global=x["prefix_v"][:1])
    with pytest.raises(ValueError, match="document_ids must have an integer dtype"):
        pk.longformer_attention(**x, **masks, window=2, document_ids=torch.zeros(1, 12))
    with pytest.raises(ValueError, match=r"document_ids must have shape \(B, N\)"):
        pk.longformer_attention(**x, **masks, window=2, document_ids=torch.zeros(1, 11, dtype=torch.long))
    ids = torch.tensor([[0, 0, 1, 1, 0, 0, 2, 2, 2, 2, 2, 2]])
    with pytest.raises(ValueError, match="contiguous run"):
        pk.longformer_attention(**x, **masks, window=2, document_ids=ids)
    pad = torch.zeros(1, 12, dtype=torch.bool)
    pad[0, 4:6] = True  # padding carries any id: 0 0 1 1 (pad pad) 2 ... is contiguous
    pk.longformer_attention(**x, is_global=masks["is_global"], key_padding_mask=pad, window=2,
                            document_ids=torch.tensor([[0, 0, 1, 1, 7, 0, 2, 2, 2, 2, 2, 2]]))


def _triton_case(problem, device):
    """The problem's tensors on `device`, and the statement to hold the kernels to: the row-by-row oracle on the
    CPU, the dense reference (tested against it above) on a GPU."""
    inputs, masks, window, kwargs = problem
    inputs = {k: t.to(device) for k, t in inputs.items()}
    masks = {k: t.to(device) for k, t in masks.items()}
    return inputs, masks, window, kwargs, row_oracle if device == "cpu" else dense_attention


@pytest.mark.program_order
@pytest.mark.usefixtures("poison_outputs")
@settings(max_examples=8, deadline=None, suppress_health_check=SHARED_FIXTURES)
@given(problem=problems(max_n=40, head_dims=(4, 8)))
def test_triton_fp32(triton_device, problem):
    inputs, masks, window, kwargs, reference = _triton_case(problem, triton_device)
    check_against_reference(op("triton"), inputs, masks, window, torch.float32,
                            random_like(inputs["q"].shape, seed=3, device=triton_device), reference=reference,
                            atol=1e-5, **kwargs)


@pytest.mark.program_order
@pytest.mark.usefixtures("poison_outputs")
@settings(max_examples=4, deadline=None, suppress_health_check=SHARED_FIXTURES)
@given(problem=problems(max_n=40, head_dims=(8, 16)))
def test_triton_fp16_within_twice_pytorch_fp16(triton_device, problem):
    inputs, masks, window, kwargs, reference = _triton_case(problem, triton_device)
    check_against_reference(op("triton"), inputs, masks, window, torch.float16,
                            random_like(inputs["q"].shape, seed=4, device=triton_device), reference=reference,
                            baseline=dense_in_dtype, **kwargs)


def triton_keep_masks(b, h, n, prefix, p, seed):
    """Dense keep masks of the Triton kernels' documented scheme (`triton/__init__.py`), built in NumPy: one counter
    space for local and global rows, prefix key `j` at `N` rounded up to a multiple of 4, plus `j` (in "separate"
    mode too: the text's and the prefix's probabilities are different columns)."""
    positions = list(range(n)) + [(n + 3) // 4 * 4 + j for j in range(prefix)]
    keep = torch.stack([philox_keep(seed, bh, range(n), positions, p) for bh in range(b * h)])
    keep = keep.view(b, h, n, n + prefix)
    return keep, keep


@pytest.mark.program_order
@pytest.mark.usefixtures("poison_outputs")
@settings(max_examples=4, deadline=None, suppress_health_check=SHARED_FIXTURES)
@given(problem=problems(max_n=32, head_dims=(4,)), p=st.sampled_from([0.2, 0.5]))
def test_triton_dropout_replays_the_documented_philox_masks(triton_device, problem, p):
    """Output and every gradient are the row statement's with the documented Philox masks on each probability
    matrix (so the backward regenerated exactly the forward's)."""
    inputs, masks, window, kwargs, _ = _triton_case(problem, triton_device)
    torch.manual_seed(7)
    seed = int(torch.randint(2**31, 2**62, (), dtype=torch.int64))  # what the op draws after manual_seed(7)
    b, n, h, _ = inputs["q"].shape
    keep = triton_keep_masks(b, h, n, inputs["prefix_k"].shape[-3], p, seed)
    cpu = {k: t.cpu() for k, t in inputs.items()}
    cpu_masks = {k: t.cpu() for k, t in masks.items()}
    grad_out = random_like(inputs["q"].shape, seed=5)
    want = run_with_grads(lambda **kw: row_oracle(**kw, keep=keep), cpu, cpu_masks, window, torch.float64,
                          grad_out.double(), dropout_p=p, **kwargs)
    torch.manual_seed(7)
    got = run_with_grads(op("triton"), {k: t.float() for k, t in inputs.items()}, masks, window, torch.float32,
                         grad_out.to(triton_device), dropout_p=p, **kwargs)
    torch.testing.assert_close(got[0].cpu().double(), want[0], atol=1e-5, rtol=1e-4)
    for g, w in zip(got[1], want[1], strict=True):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g.cpu().double(), w, atol=1e-5, rtol=1e-4)


@pytest.mark.program_order
@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("separate", [False, True])
def test_triton_gpu_tiles_with_documents(triton_device, monkeypatch, separate):
    """The GPU tile configuration (64-row tiles in fp16) through documents that straddle tiles, a one-token
    document, globals at document edges, padding after the last document, and the global rows' own prefix."""
    from prefix_kernels.backends.triton import launch as triton_launch

    monkeypatch.setattr(triton_launch, "SMALL_TILES", False)
    h = 2
    inputs, masks = make_inputs(1, 150, h, 16, dtype=torch.float64, seed=11, prefix=3, prefix_global=True,
                                prefix_scale=(h,) if separate else None, n_global={0: [0, 69, 70, 71, 140]},
                                pad={0: list(range(142, 150))}, documents=[70, 1, 71])
    kwargs = {"prefix_normalization": "separate"} if separate else {}
    inputs, masks, window, kwargs, reference = _triton_case((inputs, masks, 20, kwargs), triton_device)
    check_against_reference(op("triton"), inputs, masks, window, torch.float16,
                            random_like(inputs["q"].shape, seed=6, device=triton_device), reference=reference,
                            baseline=dense_in_dtype, **kwargs)


def _every_feature_args():
    x, masks = make_inputs(1, 12, 2, 4, prefix=2, prefix_global=True, prefix_scale=(), n_global={0: [0]},
                           documents=[5])
    return check_inputs(**x, **masks, window=2, prefix_normalization="separate")


def test_the_fused_backends_say_why():
    """The CUDA library declines each feature by name, and `auto` moves on."""
    from prefix_kernels.attention import _load

    module, why = _load("cuda")
    if module is None:
        pytest.skip(f"backend 'cuda' cannot be imported here: {why}")
    args = _every_feature_args()
    reason = module.cannot_serve(args)
    for name in ("separate", "document_ids", "prefix_k_global"):
        assert name in reason
    assert pk.attention.select_backend(args, "auto") != "cuda"


def test_the_triton_kernels_serve_every_feature():
    """The Triton backend no longer declines the features (it may still decline the device, e.g. no GPU and no
    interpreter, for its usual reasons, which never name a feature)."""
    from prefix_kernels.attention import _load

    module, why = _load("triton")
    if module is None:
        pytest.skip(f"backend 'triton' cannot be imported here: {why}")
    reason = module.cannot_serve(_every_feature_args()) or ""
    for name in ("separate", "document_ids", "prefix_k_global"):
        assert name not in reason


def test_custom_op_with_every_feature():
    """The ops' schema, fake and autograd registration with the features' tensors (opcheck), and a `fullgraph`
    compile that computes what eager does."""
    from prefix_kernels.core import custom_op

    assert pk.available_backends()["cpu"] is None  # loads the backend: its launchers are registered with the op
    x, masks = make_inputs(2, 20, 2, 4, prefix=2, prefix_global=True, prefix_scale=(2,), n_global={0: [0, 9]},
                           pad={1: [18, 19]}, documents=[9, 6], requires_grad=True)
    a = check_inputs(**x, **masks, window=3, prefix_normalization="separate")
    for dropout_p, seed in ((0.0, None), (0.2, torch.tensor(2**40, dtype=torch.int64))):
        args = (a.q, a.k, a.v, a.q_global, a.k_global, a.v_global, a.prefix_k, a.prefix_v, a.prefix_k_global,
                a.prefix_v_global, a.prefix_scale, a.key_padding_mask, a.is_global, a.document_ids, seed, "cpu",
                a.window, a.softmax_scale, dropout_p)
        torch.library.opcheck(custom_op.fused_attention_fwd, args)
    fn = lambda **kw: pk.longformer_attention(**kw, prefix_normalization="separate", backend="cpu")  # noqa: E731
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    grad_out = random_like(x["q"].shape, seed=9, dtype=torch.float32)
    want = run_with_grads(fn, x, masks, 3, torch.float32, grad_out)
    got = run_with_grads(compiled, x, masks, 3, torch.float32, grad_out)
    torch.testing.assert_close(got[0], want[0])
    for g, w in zip(got[1], want[1], strict=True):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w)
