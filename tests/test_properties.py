"""Property tests (hypothesis): random shapes, windows, masks and prefixes. The chunked reference, the Triton
kernels (through the interpreter without CUDA, compiled with it) and the "cpu" backend must equal the dense
reference (the Triton kernels and the "cpu" backend with all eight gradients), and padding rows must be 0.

Skipped as a whole without hypothesis; every other test module collects without it.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from helpers import check_against_reference, make_inputs, op, random_like  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from prefix_kernels.backends import cpu as cpu_attention  # noqa: E402
from prefix_kernels.core.checks import check_inputs  # noqa: E402
from prefix_kernels.core.reference import chunked_attention, dense_attention  # noqa: E402

# The fixtures these tests take (the device, poisoned outputs) hold no state that one example could leave to the
# next, so hypothesis may run every example inside one function-scoped fixture.
SHARED_FIXTURES = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]


@st.composite
def problems(draw, max_n=48, head_dims=(1, 3, 8)):
    """`(inputs, masks, window)`: float64 inputs, up to fully padded rows, globals anywhere (padding wins)."""
    b = draw(st.integers(1, 3))
    n = draw(st.integers(1, max_n))
    h = draw(st.integers(1, 2))
    d = draw(st.sampled_from(head_dims))
    window = draw(st.integers(0, n + 2))
    prefix = draw(st.integers(0, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    inputs, _ = make_inputs(b, n, h, d, dtype=torch.float64, seed=seed, prefix=prefix,
                            batch_prefix=draw(st.booleans()))
    g = torch.Generator().manual_seed(seed)
    is_global = torch.rand(b, n, generator=g) < draw(st.sampled_from([0.0, 0.1, 0.5]))
    pad = torch.zeros(b, n, dtype=torch.bool)
    for row in range(b):
        tail = draw(st.integers(0, n))  # up to a fully padded row
        if tail:
            pad[row, n - tail :] = True
    return inputs, {"is_global": is_global, "key_padding_mask": pad}, window


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems(), chunk=st.integers(1, 20))
def test_chunked_equals_dense(problem, chunk):
    inputs, masks, window = problem
    dense = dense_attention(**inputs, **masks, window=window)
    got = chunked_attention(check_inputs(**inputs, **masks, window=window), chunk=chunk)
    torch.testing.assert_close(got, dense, atol=1e-12, rtol=1e-10)
    assert (got[masks["key_padding_mask"]] == 0).all()


@pytest.mark.usefixtures("poison_outputs")
@settings(max_examples=12, deadline=None, suppress_health_check=SHARED_FIXTURES)
@given(problem=problems(max_n=40, head_dims=(16,)))
def test_triton_equals_dense_with_gradients(triton_device, problem):
    inputs, masks, window = problem
    inputs = {k: v.to(triton_device) for k, v in inputs.items()}
    masks = {k: v.to(triton_device) for k, v in masks.items()}
    check_against_reference(op("triton"), inputs, masks, window, torch.float32,
                            random_like(inputs["q"].shape, seed=window))


@pytest.mark.usefixtures("poison_outputs")
@settings(max_examples=40, deadline=None, suppress_health_check=SHARED_FIXTURES)
@given(
    b=st.integers(1, 3), n=st.integers(1, 90), h=st.integers(1, 2), d=st.sampled_from([4, 8, 16]),
    window=st.integers(0, 40), n_global=st.tuples(st.integers(0, 2), st.integers(0, 4)), pad_max=st.integers(0, 90),
    prefix=st.integers(0, 5), batch_prefix=st.booleans(), block=st.sampled_from([1, 3, 8, 64]),
    group_bytes=st.sampled_from([1, 3000, 1 << 20]), seed=st.integers(0, 2**16),
)
def test_cpu_backend_fp32_matches_dense_reference(b, n, h, d, window, n_global, pad_max, prefix, batch_prefix, block,
                                                  group_bytes, seed):
    """Padding, global tokens (a different count per row, some rows none, never on padding), shared and per-batch
    prefixes, windows from 0 to beyond N, any N, and block / group sizes from one row up, so partial blocks,
    several groups and the band-gradient overlap-add all run: output and all eight gradients within ~1e-5 of
    float64."""
    x, masks = make_inputs(b, n, h, d, dtype=torch.float64, seed=seed, prefix=prefix, batch_prefix=batch_prefix,
                           n_global=(min(n_global), max(n_global)), pad=pad_max)
    with mock.patch.object(cpu_attention, "BLOCK_ROWS", block), \
            mock.patch.object(cpu_attention, "GROUP_BYTES", group_bytes):
        check_against_reference(op("cpu"), x, masks, window, torch.float32, random_like((b, n, h, d), seed=seed),
                                atol=1e-5)
