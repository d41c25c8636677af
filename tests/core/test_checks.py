"""`core/checks.py`: every bad-input path raises a ValueError naming the argument; what the checks normalize
(padding wins over global, the prefix expanded, optional global projections). Dispatch: `tests/test_dispatch.py`."""

from __future__ import annotations

import pytest
import torch
from helpers import make_inputs

import prefix_kernels as pk
from prefix_kernels.core.checks import check_inputs


def base(b=2, n=10, h=2, d=4, **over):
    kw = dict(make_inputs(b, n, h, d, seed=1, prefix=2)[0], window=2)
    kw["is_global"] = torch.zeros(b, n, dtype=torch.bool)
    kw["is_global"][:, 0] = True
    kw["key_padding_mask"] = torch.zeros(b, n, dtype=torch.bool)
    kw.update(over)
    return kw


t = torch.randn


@pytest.mark.parametrize(
    "override,match",
    [
        (dict(q="x"), "q must be a torch.Tensor"),
        (dict(q=t(2, 10, 8)), "q must have rank 4"),
        (dict(q=torch.ones(2, 10, 2, 4, dtype=torch.int32)), "q must be float"),
        (dict(k=t(2, 10, 2, 5)), "k must have shape"),
        (dict(v=t(2, 10, 2)), "v must have rank 4"),
        (dict(k=t(2, 10, 2, 4, dtype=torch.float64)), "k has dtype"),
        (dict(v=t(2, 10, 2, 4, device="meta")), "v is on meta"),
        (dict(window=-1), "window must be >= 0"),
        (dict(window=2.5), "window must be an int"),
        (dict(window=True), "window must be an int"),
        (dict(is_global=torch.zeros(2, 9, dtype=torch.bool)), "is_global must have shape"),
        (dict(is_global=torch.zeros(2, 10)), "is_global must have dtype torch.bool"),
        (dict(key_padding_mask=torch.zeros(10, dtype=torch.bool)), "key_padding_mask must have shape"),
        (dict(key_padding_mask=[[0] * 10] * 2), "key_padding_mask must be a"),
        (dict(q_global=None), "q_global missing"),
        (dict(q_global=None, k_global=None, v_global=None), "required when any token is_global"),
        (dict(k_global=t(2, 10, 2, 3)), "k_global must have shape"),
        (dict(prefix_v=None), "prefix_v missing"),
        (dict(prefix_k=None), "prefix_k missing"),
        (dict(prefix_k=t(2, 3, 4), prefix_v=t(2, 3, 4)), "prefix_k must have shape"),
        (dict(prefix_k=t(3, 2, 2, 4), prefix_v=t(3, 2, 2, 4)), "prefix_k must have shape"),
        (dict(prefix_v=t(3, 2, 4)), "prefix_v must have the shape of prefix_k"),
        (dict(prefix_k=t(2, 2, 2, 2, 4)), "prefix_k must have shape"),
        (dict(softmax_scale=0.0), "softmax_scale must be positive"),
        (dict(softmax_scale="1"), "softmax_scale must be a float"),
        (dict(dropout_p=1.0), "dropout_p must be a float in"),
        (dict(dropout_p=-0.1), "dropout_p must be a float in"),
        (dict(backend="fast"), "backend must be one of"),
    ],
)
def test_bad_input_raises_value_error_naming_argument(override, match):
    with pytest.raises(ValueError, match=match):
        pk.longformer_attention(**base(**override))


def test_global_projections_may_be_omitted_when_no_token_is_global():
    kw = base(q_global=None, k_global=None, v_global=None, is_global=torch.zeros(2, 10, dtype=torch.bool))
    args = check_inputs(**kw)
    assert args.is_global is None and args.q_global is None
    out = pk.longformer_attention(**kw, backend="reference")
    assert out.shape == (2, 10, 2, 4) and torch.isfinite(out).all()


def test_padding_wins_over_global_and_prefix_is_expanded():
    kw = base()
    kw["key_padding_mask"][:, 0] = True
    args = check_inputs(**kw)
    assert not (args.is_global & args.key_padding_mask).any()
    assert args.prefix_k.shape == (2, 2, 2, 4) and args.prefix_k.stride(0) == 0
    empty = check_inputs(**base(prefix_k=t(0, 2, 4), prefix_v=t(0, 2, 4)))
    assert empty.prefix_k is None and empty.num_prefix == 0
