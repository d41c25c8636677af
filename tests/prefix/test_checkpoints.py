"""Checkpoints written by `save_pretrained` / `Trainer`: `from_pretrained_with_prefix` rebuilds the model with its
prefix, and a prefix-carrying checkpoint loaded without it is reported loudly instead of silently computing
something else."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_models import batch, build, main_output

transformers = pytest.importorskip("transformers")

import prefix_kernels as pk  # noqa: E402
from prefix_kernels.prefix.base import PREFIX_CONFIG_KEY  # noqa: E402

P = 4
CLASSIFIER = "LongformerForSequenceClassification"


def trained(name: str, apply, **kwargs):
    """A model with a prefix and a head moved away from their init (stands in for training)."""
    model = build(name)
    apply(model, num_prefix=P, backend="reference", **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    return model


def prefix_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "prefix" in str(w.message)]


@pytest.mark.parametrize("name, apply, kwargs", [
    (CLASSIFIER, pk.apply_prefix_propagation, {"pool_prefix": True}),
    ("LEDForConditionalGeneration", pk.apply_prefix_tuning, {}),
    ("LongformerForTokenClassification", pk.apply_prefix_tuning, {"dropout": 0.2}),
])
def test_save_pretrained_round_trip(tmp_path, name, apply, kwargs):
    model = trained(name, apply, **kwargs).eval()
    model.save_pretrained(tmp_path)
    inputs = batch(name)
    with torch.no_grad():
        want = main_output(model(**inputs))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        loaded = pk.from_pretrained_with_prefix(getattr(transformers, name), tmp_path, backend="reference")
    assert not prefix_warnings(record)
    want_type = pk.PrefixPropagation if apply is pk.apply_prefix_propagation else pk.PrefixTuning
    prefix = next(m for m in loaded.modules() if isinstance(m, (pk.PrefixPropagation, pk.PrefixTuning)))
    assert type(prefix) is want_type
    assert prefix.dropout.p == kwargs.get("dropout", 0.0)
    assert getattr(prefix, "pool_prefix", False) == kwargs.get("pool_prefix", False)
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        torch.testing.assert_close(main_output(loaded(**inputs)), want, atol=0, rtol=0)


def test_trainer_checkpoint_round_trip(tmp_path):
    """The checkpoint directory a `Trainer` writes (as `save_pretrained` does), loaded with one call."""
    pytest.importorskip("accelerate")
    model = build(CLASSIFIER)
    pk.apply_prefix_propagation(model, num_prefix=P, backend="reference")
    inputs = batch(CLASSIFIER, b=4)
    rows = [{k: v[i] for k, v in inputs.items()} | {"labels": torch.tensor(i % 3)} for i in range(4)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                                          learning_rate=5e-2, report_to=[], save_strategy="steps", save_steps=2,
                                          use_cpu=True)
    transformers.Trainer(model=model, args=args, train_dataset=rows).train()
    model.eval()
    check = {k: v[:2] for k, v in inputs.items()}
    with torch.no_grad():
        want = model(**check).logits
        loaded = pk.from_pretrained_with_prefix(transformers.AutoModelForSequenceClassification,
                                                tmp_path / "checkpoint-2", backend="reference")
        torch.testing.assert_close(loaded(**check).logits, want, atol=0, rtol=0)
        plain = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "checkpoint-2")
        assert not torch.allclose(plain(**check).logits, want, atol=1e-4)  # what the warning is about


@pytest.mark.parametrize("layout", ["sharded", "bin"])
def test_other_weight_layouts(tmp_path, layout):
    model = trained(CLASSIFIER, pk.apply_prefix_propagation).eval()
    if layout == "sharded":
        model.save_pretrained(tmp_path, max_shard_size="20KB")
        assert (tmp_path / "model.safetensors.index.json").is_file()
    else:  # the old format: a torch.save'd state dict
        model.save_pretrained(tmp_path)
        (tmp_path / "model.safetensors").unlink()
        torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    loaded = pk.from_pretrained_with_prefix(transformers.LongformerForSequenceClassification, tmp_path,
                                            backend="reference")
    inputs = batch(CLASSIFIER)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, atol=0, rtol=0)


def test_loading_without_the_prefix_warns(tmp_path):
    trained(CLASSIFIER, pk.apply_prefix_propagation).save_pretrained(tmp_path)
    cls = transformers.LongformerForSequenceClassification
    assert getattr(cls.from_pretrained(tmp_path).config, PREFIX_CONFIG_KEY)["num_prefix"] == P
    with pytest.warns(UserWarning, match="from_pretrained_with_prefix"):
        pk.patch_longformer(cls.from_pretrained(tmp_path), "reference")
    with pytest.warns(UserWarning, match="prefix-propagation prefix"), pk.patch_longformer_classes("reference"):
        cls.from_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="has none"):  # a new prefix replaces the saved one
        pk.apply_prefix_tuning(cls.from_pretrained(tmp_path), num_prefix=2, backend="reference")


def test_checkpoint_without_a_prefix_is_refused(tmp_path):
    build(CLASSIFIER).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="records no prefix"):
        pk.from_pretrained_with_prefix(transformers.LongformerForSequenceClassification, tmp_path)
