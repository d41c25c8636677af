"""PEFT on a prefix model: `get_peft_model` freezes every parameter that is not an adapter's, the prefix included;
the package warns when a model trains with a frozen prefix, `unfreeze_prefix` makes it train again (LoRA and the
prefix together), and `pool_prefix` still pools the prefix slot when PEFT copies the classifier head."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_models import batch, build

import prefix_kernels as pk

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

NAME = "LongformerForSequenceClassification"


def lora(model):
    config = peft.LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"], r=4)
    return peft.get_peft_model(model, config)


@pytest.mark.parametrize("apply", [pk.apply_prefix_propagation, pk.apply_prefix_tuning])
def test_lora_and_prefix_train_together(apply):
    model = build(NAME)
    prefix = apply(model, num_prefix=3, backend="cpu")
    wrapped = lora(model).train()
    assert not any(p.requires_grad for p in prefix.parameters())  # what PEFT does
    inputs = {**batch(NAME), "labels": torch.tensor([0, 2])}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapped(**inputs)
        wrapped(**inputs)
    frozen = [w for w in caught if "frozen" in str(w.message)]
    assert len(frozen) == 1 and "unfreeze_prefix" in str(frozen[0].message)

    assert pk.unfreeze_prefix(wrapped) is prefix
    params = [p for p in wrapped.parameters() if p.requires_grad]
    names = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in names) and any("prefix" in n for n in names)
    before = {n: p.detach().clone() for n, p in wrapped.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params, lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no more warning
        wrapped(**inputs).loss.backward()
    opt.step()
    moved = {n for n, p in wrapped.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    assert any("prefix" in n for n in moved) and any("lora_B" in n for n in moved)


def test_pool_prefix_survives_peft_copying_the_head():
    """PEFT's `SEQ_CLS` task deep-copies the classifier into `modules_to_save`: its logits are still computed from
    prefix slot 0 (the same as the unwrapped model's), not from `<s>`."""
    model = build(NAME)
    pk.apply_prefix_propagation(model, num_prefix=3, pool_prefix=True, backend="cpu")
    inputs = batch(NAME)
    with torch.no_grad():
        # What pooling `<s>` would give: the head's own forward, without the pre-hook that hands it the prefix rows.
        pooled_s = model.classifier.forward(model.longformer(**inputs).last_hidden_state)
        want = model(**inputs).logits
        wrapped = lora(model).eval()
        got = wrapped(**inputs).logits  # LoRA's B starts at 0: the same function
    gap = (pooled_s - want).abs().max()
    assert gap > 0 and (got - want).abs().max() <= gap / 100


def test_unfreeze_prefix_refuses_a_model_without_prefix_or_with_a_copy():
    with pytest.raises(ValueError, match="no prefix"):
        pk.unfreeze_prefix(build(NAME))
    model = build(NAME)
    pk.apply_prefix_tuning(model, num_prefix=2, backend="cpu")
    config = peft.LoraConfig(task_type="SEQ_CLS", target_modules=["query"], modules_to_save=["prefix_tuning"])
    with pytest.raises(ValueError, match="modules_to_save"):
        pk.unfreeze_prefix(peft.get_peft_model(model, config))
