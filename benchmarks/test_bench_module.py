"""Module and model level: Hugging Face's eager Longformer vs the same modules patched with each backend.

Module level: one random-init `LongformerSelfAttention` (from `LongformerConfig`) fed the same hidden states and
HF's float mask; provider `hf` runs it as is, the others after `patch_longformer(module, backend)`. Both sides
include the six projections, so the comparison is like for like. Forward+backward differentiates the hidden
states and every parameter (`torch.autograd.grad`, nothing accumulates).

Model level: a random-init longformer-base `LongformerForSequenceClassification` (hidden 768, 12 layers,
12 heads, window 512, one global token `<s>`), one training step's forward + loss backward under bf16 autocast
(fp32 weights), HF vs patched. On the CPU a tiny config (2 layers, hidden 128, window 128) in fp32 and under
CPU bf16 autocast.
"""

from __future__ import annotations

import os

import pytest
import torch
from bench_utils import attention_flops, free_memory, projection_flops, run_benchmark
from matrix import params


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _patch(model: torch.nn.Module, provider: str) -> dict:
    """Patch `model` for `provider` (no-op for `hf`), or skip with the reason it cannot run."""
    if provider == "hf":
        return {"backend": "hf eager"}
    try:
        import prefix_kernels as pk
        from prefix_kernels.hf.patching import is_patched
    except ImportError as exc:
        pytest.skip(f"prefix_kernels.patch_longformer unavailable: {exc}")
    why = pk.available_backends().get(provider)
    if why is not None:
        pytest.skip(f"backend {provider!r} unavailable: {why}")
    pk.patch_longformer(model, backend=provider)
    assert is_patched(model), "patch_longformer left the model unpatched"
    return {"backend": provider}


def _call_or_skip(fn) -> None:
    try:
        fn()
    except ValueError as exc:  # an explicit backend that cannot serve this call
        pytest.skip(str(exc))


def _skip_oom(run_case, *args) -> None:
    oom = None
    try:
        run_case(*args)
    except torch.cuda.OutOfMemoryError as exc:  # the case's tensors die with run_case's frame
        oom = str(exc).splitlines()[0]
    if oom is not None:
        free_memory()
        pytest.skip(f"out of memory: {oom}")


def _module_case(benchmark, provider, shape, mode, device) -> None:
    from transformers import LongformerConfig
    from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

    torch.manual_seed(0)
    hidden = shape.H * shape.D
    config = LongformerConfig(hidden_size=hidden, num_attention_heads=shape.H, attention_window=[2 * shape.w],
                              attention_probs_dropout_prob=0.0)
    module = LongformerSelfAttention(config, layer_id=0).to(device=device, dtype=shape.torch_dtype)
    module.train(mode == "fwdbwd")
    info = _patch(module, provider)
    x = torch.randn(shape.B, shape.N, hidden, device=device, dtype=shape.torch_dtype)
    x.requires_grad_(mode == "fwdbwd")
    is_global, pad = shape.masks(device)
    # HF's layer input: 0 local, finfo.max global, finfo.min padding (what LongformerModel hands every layer).
    mask = torch.zeros(shape.B, shape.N, device=device, dtype=shape.torch_dtype)
    mask[is_global] = torch.finfo(shape.torch_dtype).max
    mask[pad] = torch.finfo(shape.torch_dtype).min
    kwargs = dict(attention_mask=mask, is_index_masked=mask < 0, is_index_global_attn=mask > 0,
                  is_global_attn=shape.G > 0)
    leaves = [x, *module.parameters()]
    grad_out = torch.randn(shape.B, shape.N, hidden, device=device, dtype=shape.torch_dtype)

    def step():
        if mode == "fwd":
            with torch.no_grad():
                return module(x, **kwargs)[0]
        return torch.autograd.grad(module(x, **kwargs)[0], leaves, grad_out)

    _call_or_skip(step)
    flops = attention_flops(shape, mode) + projection_flops(shape.B * shape.N, shape.B * shape.G, hidden, mode)
    run_benchmark(benchmark, step, device, level="module", provider=provider, shape=shape, mode=mode,
                  flops=flops, info=info)


@pytest.mark.parametrize("provider, shape, mode", params("module"))
def test_module(benchmark, provider, shape, mode):
    device = _device()
    if device.type == "cpu" and shape.dtype == "fp16":
        pytest.skip("fp16 shapes need a GPU (CPUs have no fast fp16 matmuls)")
    _skip_oom(_module_case, benchmark, provider, shape, mode, device)


def _model_config(shape, device):
    from transformers import LongformerConfig

    size = {} if device.type == "cuda" else dict(num_hidden_layers=2, intermediate_size=4 * shape.H * shape.D)
    dropout = float(os.environ.get("PK_BENCH_MODEL_DROPOUT", "0.1"))  # HF's default, as in fine-tuning
    return LongformerConfig(hidden_size=shape.H * shape.D, num_attention_heads=shape.H, attention_window=2 * shape.w,
                            max_position_embeddings=shape.N + 2, vocab_size=50265, num_labels=2,
                            attention_probs_dropout_prob=dropout, hidden_dropout_prob=dropout, **size)


def _model_flops(config, shape) -> float:
    """Encoder matmuls and attention, forward + backward (embeddings and the classifier head left out)."""
    c, tokens = config.hidden_size, shape.B * shape.N
    per_layer = projection_flops(tokens, shape.B * shape.G, c, "fwdbwd")
    per_layer += 3.0 * 2.0 * tokens * (c * c + 2 * c * config.intermediate_size)  # output dense + FFN
    return config.num_hidden_layers * (per_layer + attention_flops(shape, "fwdbwd"))


def _model_case(benchmark, provider, shape, mode, device) -> None:
    from transformers import LongformerForSequenceClassification

    config = _model_config(shape, device)
    torch.manual_seed(0)
    with torch.device(device):  # initialize on the device: seconds less per case for longformer-base
        model = LongformerForSequenceClassification(config)
    model.to(device).train()
    info = _patch(model, provider)
    low_precision = shape.dtype != "fp32"
    info.update(layers=config.num_hidden_layers, hidden=config.hidden_size, autocast=low_precision,
                dropout=config.attention_probs_dropout_prob)
    g = torch.Generator(device=device).manual_seed(0)
    input_ids = torch.randint(3, config.vocab_size, (shape.B, shape.N), generator=g, device=device)
    global_mask = torch.zeros_like(input_ids)
    global_mask[:, : shape.G] = 1
    labels = torch.randint(0, 2, (shape.B,), generator=g, device=device)
    autocast = torch.autocast(device.type, dtype=shape.torch_dtype, enabled=low_precision)

    def step():
        model.zero_grad(set_to_none=True)
        with autocast:
            loss = model(input_ids=input_ids, global_attention_mask=global_mask, labels=labels).loss
        loss.backward()

    _call_or_skip(step)
    # Gradients count as extra memory, like activations: drop them before the measured call.
    run_benchmark(benchmark, step, device, level="model", provider=provider, shape=shape,
                  shape_id=f"model-{shape.id}", mode=mode, flops=_model_flops(config, shape), info=info,
                  before_memory=lambda: model.zero_grad(set_to_none=True))


@pytest.mark.parametrize("provider, shape, mode", params("model", modes=("fwdbwd",)))
def test_model(benchmark, provider, shape, mode):
    device = _device()
    if device.type == "cpu" and shape.dtype == "fp16":
        pytest.skip("fp16 autocast needs a GPU (CPUs have no fast fp16 matmuls)")
    _skip_oom(_model_case, benchmark, provider, shape, mode, device)
