"""Hugging Face glue: `patching` swaps the classes of Longformer / LED-encoder self-attention (and their encoders)
for subclasses that compute through `longformer_attention`; `self_attention` is the patched module's forward.
Imports transformers only when a model is patched.
"""
