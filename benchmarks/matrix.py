"""Which (provider, shape, mode) cases each benchmark level runs, per `PK_BENCH_MATRIX`.

* `full` (GPU): op and module level for bf16 and fp16, B in {1, 4}, N in {1024, 4096, 16384, 32768}; op level
  for two mask families, `G17-P0` (prefix-propagation: 16 prefix slots + `<s>` as global tokens) and `G1-P16`
  (prefix-tuning: `<s>` global + 16 prefix keys/values); model level N in {4096, 16384}.
* `short` (GPU, ~4 minutes with compiles): the headline shape (bf16, B=4, N=16384, H=12, D=64, w=256, G=17)
  for every provider, plus N = 4096 and 32768 for the fused backends and SDPA, the prefix-tuning family at the
  headline N (fused backends and FlexAttention), the module level at the headline shape and the model level.
* `cpu`: op level on small fp32 shapes (the `cpu` and `reference` backends, SDPA; Triton only under
  `TRITON_INTERPRET=1`, one tiny shape); module level in fp32 and bf16 (`hf`, `cpu`, `reference`) at N = 256, 512
  (H=4, D=32, w=64, 5 globals) and N = 4096 (H=4, D=64, w=128, one global); model level (a tiny 2-layer
  classifier, dropout 0.1, fp32 and bf16 autocast) at N = 256 and 4096, `hf` vs `cpu`.

`PK_BENCH_N` / `PK_BENCH_B` replace the N / B lists; `PK_BENCH_{DTYPES,PROVIDERS,MODES,LEVELS}` filter.
"""

from __future__ import annotations

import os

import pytest
from bench_utils import MODES, Shape, env_ints, matrix_name, selected

OP_PROVIDERS = ("reference", "triton", "cuda", "flex", "sdpa")
CPU_DTYPES = ("fp32", "bf16")
MODULE_PROVIDERS = ("hf", "reference", "triton", "cuda")
MODEL_PROVIDERS = ("hf", "triton", "cuda")
HEADLINE_N = 16384
HEADLINE = Shape("bf16", 4, HEADLINE_N)  # one longformer-base layer, 16 prefix slots + <s> global


def run_priority(level: str, provider: str, shape: Shape) -> int:
    """Run order, so that a run cut off by a time limit has measured what matters most: the headline shape
    (reference last), then the model level, then the rest (the reference backend last)."""
    if provider == "reference":
        return 3
    if shape == HEADLINE:
        return 0
    return 1 if level == "model" else 2


def _op_cases(name: str) -> list[tuple[str, Shape]]:
    if name == "cpu":
        ns = env_ints("PK_BENCH_N", (256, 512))
        cases = [(p, Shape("fp32", b, n, H=4, D=32, w=64, G=g, P=pp))
                 for b in env_ints("PK_BENCH_B", (1,)) for n in ns for g, pp in ((5, 0), (1, 4))
                 for p in ("cpu", "reference", "flex", "sdpa")]
        # The Triton interpreter runs every program in numpy: one tiny shape, only when it is switched on.
        if os.environ.get("TRITON_INTERPRET") == "1":
            cases += [(p, Shape("fp32", 1, 128, H=2, D=32, w=32, G=3, P=4)) for p in ("triton", "reference")]
        return cases
    if name == "short":
        ns = env_ints("PK_BENCH_N", (4096, HEADLINE_N, 32768))
        cases = []
        for b in env_ints("PK_BENCH_B", (4,)):
            for n in ns:
                shape = Shape("bf16", b, n)
                providers = ["triton", "cuda", "sdpa"]
                # FlexAttention compiles per shape (~10-30 s each, forward and backward): headline N only.
                providers += ["flex", "reference"] if n == HEADLINE_N else []
                cases += [(p, shape) for p in providers]
            cases += [(p, Shape("bf16", b, HEADLINE_N, G=1, P=16)) for p in ("triton", "cuda", "flex")]
        return cases
    return [(p, Shape(dt, b, n, G=g, P=pp))
            for dt in ("bf16", "fp16") for b in env_ints("PK_BENCH_B", (1, 4))
            for n in env_ints("PK_BENCH_N", (1024, 4096, HEADLINE_N, 32768)) for g, pp in ((17, 0), (1, 16))
            for p in OP_PROVIDERS]


def _module_cases(name: str) -> list[tuple[str, Shape]]:
    if name == "cpu":
        # Small shapes (overheads dominate) and the 4k-token layer of issue-sized Longformers (B=1, C=256, w=128).
        shapes = [(n, dict(H=4, D=32, w=64, G=5)) if n < 4096 else (n, dict(H=4, D=64, w=128, G=1))
                  for n in env_ints("PK_BENCH_N", (256, 512, 4096))]
        return [(p, Shape(dt, b, n, **kw)) for dt in CPU_DTYPES for b in env_ints("PK_BENCH_B", (1,))
                for n, kw in shapes for p in ("hf", "cpu", "reference")]
    if name == "short":
        return [(p, Shape("bf16", b, HEADLINE_N)) for b in env_ints("PK_BENCH_B", (4,))
                for p in ("hf", "triton", "cuda")]
    return [(p, Shape(dt, b, n)) for dt in ("bf16", "fp16") for b in env_ints("PK_BENCH_B", (1, 4))
            for n in env_ints("PK_BENCH_N", (1024, 4096, HEADLINE_N, 32768)) for p in MODULE_PROVIDERS]


def _model_cases(name: str) -> list[tuple[str, Shape]]:
    # Model shapes describe the encoder's attention: H=12, D=64, w=256 (window 512), one global token (<s>).
    if name == "cpu":  # a tiny config: 2 layers, hidden 128; bf16 = CPU autocast
        return [(p, Shape(dt, 1, n, H=4, D=32, w=64, G=1)) for dt in CPU_DTYPES
                for n in env_ints("PK_BENCH_MODEL_N", (256, 4096)) for p in ("hf", "cpu")]
    return [(p, Shape("bf16", 1, n, G=1)) for n in env_ints("PK_BENCH_MODEL_N", (4096, HEADLINE_N))
            for p in MODEL_PROVIDERS]


_LEVELS = {"op": _op_cases, "module": _module_cases, "model": _model_cases}


def params(level: str, modes: tuple[str, ...] = MODES) -> list:
    """`pytest.param(provider, shape, mode)` for `level`, with readable ids usable in `-k`."""
    if not selected("LEVELS", level):
        return []
    out = []
    for provider, shape in _LEVELS[level](matrix_name()):
        for mode in modes:
            if selected("DTYPES", shape.dtype) and selected("PROVIDERS", provider) and selected("MODES", mode):
                out.append(pytest.param(provider, shape, mode, id=f"{level}-{mode}-{provider}-{shape.id}"))
    return out
