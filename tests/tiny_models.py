"""Tiny random Longformer / LED models and batches for the Hugging Face integration tests (no downloads)."""

from __future__ import annotations

import torch
from helpers import assert_close_scaled

LONGFORMER = dict(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    attention_window=[8, 16],  # per-layer windows; HF pads to a multiple of the largest
    max_position_embeddings=160,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
    sep_token_id=2,
    type_vocab_size=2,
    num_labels=3,
)
LED = dict(
    vocab_size=64,
    d_model=32,
    encoder_layers=2,
    decoder_layers=1,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    attention_window=[8, 16],
    max_encoder_position_embeddings=160,
    max_decoder_position_embeddings=64,  # LED sequence classification decodes the whole input
    dropout=0.0,
    attention_dropout=0.0,
    activation_dropout=0.0,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
    decoder_start_token_id=2,
    num_labels=3,
)
LONGFORMER_CLASSES = (
    "LongformerModel",
    "LongformerForSequenceClassification",
    "LongformerForQuestionAnswering",
    "LongformerForTokenClassification",
    "LongformerForMultipleChoice",
    "LongformerForMaskedLM",
)
# transformers 5 dropped LEDForSequenceClassification; the tests take what the installed version has.
LED_CLASSES = tuple(
    name
    for name in ("LEDModel", "LEDForConditionalGeneration", "LEDForQuestionAnswering", "LEDForSequenceClassification")
    if hasattr(__import__("transformers"), name)
)


def build(name: str, seed: int = 0, head_dim: int = 8, **overrides) -> torch.nn.Module:
    """A freshly initialized model of class `name` (e.g. "LongformerForSequenceClassification"), in eval mode, with
    4 heads of `head_dim` (the CUDA library is compiled for head dims 16-128)."""
    import transformers

    cls = getattr(transformers, name)
    if "QuestionAnswering" in name:
        overrides.setdefault("num_labels", 2)  # start and end logits
    if head_dim != 8:
        overrides.setdefault("d_model" if name.startswith("LED") else "hidden_size", 4 * head_dim)
    if name.startswith("LED"):
        config = transformers.LEDConfig(**{**LED, **overrides})
    else:
        config = transformers.LongformerConfig(**{**LONGFORMER, **overrides})
    torch.manual_seed(seed)
    return cls(config).eval()


def batch(name: str, b: int = 2, n: int = 45, seed: int = 0, choices: int = 2, device="cpu") -> dict:
    """Inputs for model class `name` on `device`: row 1 padded at the tail, globals at different places per row."""
    g = torch.Generator().manual_seed(seed)
    lead = (b, choices) if "MultipleChoice" in name else (b,)
    ids = torch.randint(3, 64, (*lead, n), generator=g)
    mask = torch.ones_like(ids)
    glob = torch.zeros_like(ids)
    glob[..., 0] = 1
    glob[0, ..., 20] = 1
    ids[1, ..., n - 11 :] = 1  # the pad token
    mask[1, ..., n - 11 :] = 0
    ids[..., n - 1 - 11 * (b > 1)] = 2  # an eos before the padding, as LED sequence classification needs
    glob[1, ..., 3] = 1
    out = {"input_ids": ids, "attention_mask": mask, "global_attention_mask": glob}
    if name.startswith("LED") and name != "LEDForSequenceClassification":
        out["decoder_input_ids"] = torch.randint(3, 64, (b, 7), generator=g)
    return {k: t.to(device) for k, t in out.items()}


def main_output(out) -> torch.Tensor:
    """The output a loss would be built on: logits, start logits or the last hidden state."""
    for key in ("logits", "start_logits", "last_hidden_state"):
        if isinstance(out, dict) and out.get(key) is not None:
            return out[key]
    return out[0]


def scalar_loss(out, seed: int = 0) -> torch.Tensor:
    """A fixed random projection of the main output, so every output element gets a distinct gradient (the same
    projection on every device)."""
    y = main_output(out)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype).to(y.device)
    return (y * w).sum()


def run_model(model: torch.nn.Module, inputs: dict, **kwargs) -> tuple:
    """Forward, and backward of `scalar_loss`: the output and every parameter's gradient by name (`None` for a
    parameter that got none)."""
    model.zero_grad(set_to_none=True)
    out = model(**inputs, **kwargs)
    scalar_loss(out).backward()
    return out, {n: p.grad for n, p in model.named_parameters()}


def assert_same_grads(got: dict, want: dict, tol: float = 1e-5) -> None:
    """`got` and `want` (`{name: gradient or None}`): the same parameters, the same ones with a gradient, and
    every gradient within `tol * max(1, max |want|)`."""
    assert got.keys() == want.keys()
    with_grad = {n for n, g in want.items() if g is not None}
    assert {n for n, g in got.items() if g is not None} == with_grad, "not the same parameters get a gradient"
    assert with_grad, "no gradient to compare"
    for name in with_grad:
        assert_close_scaled(got[name], want[name], tol, name)


def enable_checkpointing(model: torch.nn.Module) -> None:
    """HF gradient checkpointing under the name the installed transformers prefers."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
