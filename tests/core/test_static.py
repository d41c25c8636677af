"""`core/static.py`: the static formulation the exporters trace (shapes that follow from the input shapes alone)
against the dense reference. Its export with whole models is in `hf/test_export.py`.
"""

from __future__ import annotations

import pytest
import torch
from helpers import make_inputs

from prefix_kernels.core.checks import check_inputs
from prefix_kernels.core.reference import dense_attention
from prefix_kernels.core.static import static_attention


@pytest.mark.parametrize("seed", range(6))
def test_static_attention_matches_the_dense_reference(seed):
    b, n, h, d = 3, 37, 2, 8
    x, masks = make_inputs(b, n, h, d, dtype=torch.float64, seed=seed, prefix=(0, 3)[seed % 2],
                           batch_prefix=seed % 3 == 0, n_global=(0, 4), pad=12, mask_seed=seed)
    glob, pad = masks["is_global"], masks["key_padding_mask"]
    if seed == 4:  # no global tokens at all
        glob = None
        for name in ("q_global", "k_global", "v_global"):
            x.pop(name)
    kwargs = dict(window=1 + seed, is_global=glob, key_padding_mask=pad, **x)
    torch.testing.assert_close(static_attention(check_inputs(**kwargs)), dense_attention(**kwargs), atol=1e-12,
                               rtol=0)


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
