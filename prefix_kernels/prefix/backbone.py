"""What the prefixes need to know about a Longformer or LED model (`_Backbone`): its base module, layers,
attention modules, sizes, position table, and which parameters the prefix methods freeze.
"""

from __future__ import annotations

from torch import nn

from ..hf.patching import _LED, _LONGFORMER, _attention_modules, _hf_classes


class _Backbone:
    """What the prefixes need to know about a model: its base module, layers, attention modules and sizes."""

    def __init__(self, model: nn.Module):
        # HF's own classes: while the classes are patched, the module-level names are the patched subclasses.
        LongformerModel = _hf_classes("model")[f"{_LONGFORMER}:LongformerModel"]  # noqa: N806
        LEDEncoder = _hf_classes("encoder").get(f"{_LED}:LEDEncoder", ())  # noqa: N806
        try:
            from transformers.models.led.modeling_led import LEDModel
        except ImportError:  # an install without LED
            LEDModel = ()  # noqa: N806

        base = next((m for m in model.modules() if isinstance(m, (LongformerModel, LEDEncoder))), None)
        if base is None:
            raise ValueError(f"{type(model).__name__} is not a Longformer or LED model")
        self.kind = "longformer" if isinstance(base, LongformerModel) else "led"
        self.base = base
        config = base.config
        self.config = config
        if self.kind == "longformer":
            self.layers = base.encoder.layer
            self.hidden_size = config.hidden_size
            self.hidden_dropout = config.hidden_dropout_prob
            self.padding_idx = base.embeddings.padding_idx
            # The pooler of a task model (multiple choice) is part of its head; a bare LongformerModel trains
            # only the prefix.
            frozen = [model] if model is base else [base.embeddings, base.encoder]
        else:
            self.layers = base.layers
            self.hidden_size = config.d_model
            self.hidden_dropout = config.dropout
            self.padding_idx = base.padding_idx
            led = next((m for m in model.modules() if isinstance(m, LEDModel)), None)
            frozen = [led if led is not None else base]
        self.num_layers = len(self.layers)
        if self.kind == "longformer":
            self.positions = base.embeddings.position_embeddings.num_embeddings
        else:
            self.positions = base.embed_positions.num_embeddings
        window = config.attention_window
        self.window = window if isinstance(window, int) else max(window)
        # The module whose output is the first layer's input, and those that carry HF's checkpointing flag
        # (the encoder in older transformers, every layer in newer ones).
        if self.kind == "longformer":
            self.embedding_output, self.checkpointed = base.embeddings, [base.encoder, *self.layers]
        else:
            self.embedding_output, self.checkpointed = base.layernorm_embedding, [base, *self.layers]
        self.num_heads = config.encoder_attention_heads if self.kind == "led" else config.num_attention_heads
        self.frozen_ids = {id(p) for m in frozen for p in m.parameters()}
        self.attentions = []
        for layer in self.layers:
            found = _attention_modules(layer)
            if len(found) != 1:
                raise ValueError(f"expected one self-attention per layer, found {len(found)}")
            self.attentions.append(found[0])
