"""What `longformer_attention` computes, with no knowledge of any backend: argument checks (`checks`), the masks
and the one per-mask cache (`masks`), the semantics and the oracle (`reference`), the export formulation
(`static`), the global rows computed from the hidden states (`global_rows`), and the custom op shared by the
fused backends (`custom_op`), which is handed each backend's launchers by the dispatcher, and whether a tracer
(`torch.compile`, an exporter) runs (`tracing`).
"""
