"""The prefix position limit counts what Hugging Face counts: Longformer's padding tokens take no position, so a
batch padded to the model's full length runs with a prefix as long as no row has more real tokens than the limit;
under `torch.compile` the check stays on shapes (no host read in the graph)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build

import prefix_kernels as pk

pytest.importorskip("transformers")
P = 4


@pytest.mark.parametrize("apply", [pk.apply_prefix_propagation, pk.apply_prefix_tuning])
def test_a_batch_padded_to_the_full_length_runs_with_a_prefix(apply):
    model = build("LongformerModel")  # 160 positions, padding_idx 1: HF takes 158 tokens
    prefix = apply(model, num_prefix=P, backend="cpu")
    full = 160 - 2
    assert prefix.max_length == full - P
    ids = torch.randint(3, 64, (2, full))
    ids[0, prefix.max_length :] = 1  # padded: its real tokens fit
    ids[1, 20:] = 1
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=(ids != 1).long())
    assert out.last_hidden_state.shape == (2, full, 32) and torch.isfinite(out.last_hidden_state).all()
    ids[0, prefix.max_length] = 5  # one real token more than the limit
    with pytest.raises(ValueError, match=rf"{prefix.max_length + 1} tokens that take a position .*padding tokens take"):
        model(input_ids=ids)


def test_under_compile_the_check_is_on_shapes():
    model = build("LongformerModel")
    prefix = pk.apply_prefix_propagation(model, num_prefix=P, backend="cpu")
    ids = torch.randint(3, 64, (1, prefix.max_length + 8))
    ids[:, prefix.max_length :] = 1
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad(), pytest.raises(Exception, match="under torch.compile and export the check is on the shape"):
        compiled(input_ids=ids)
    with torch.no_grad():
        model(input_ids=ids)  # eager: the real tokens fit
