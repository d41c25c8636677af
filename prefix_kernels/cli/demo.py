"""`python -m prefix_kernels demo`: prefix-propagation (or prefix-tuning) on a synthetic long-document task,
trained once with `longformer_attention` and once with Hugging Face's own attention, side by side; each run's
accuracy with its expected calibration error.

The task: each document holds three cue tokens, one in each third, far more than a window apart; the label
says whether most of them are the "positive" cue. No local window sees two cues, so the answer has to be
gathered by global tokens (the prefix slots, or `<s>`). The backbone is random and frozen; only the prefix and
the classification head learn. With no arguments it builds a small random model (no download) and finishes in
well under two minutes on two CPU cores. `--prefix-attention separate` (with `--kernel`) runs the paper's
kernel-attention variant, which HF's attention cannot compute (no HF run then).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

from ..attention import BACKEND_ORDER, available_backends, resolve_backend
from .args import HelpFormatter, default_device, device_arg, positive_float, positive_int
from .memory import peak_memory

BOS, PAD, EOS = 0, 1, 2
CUE_POS, CUE_NEG = 4, 5  # the two cue tokens; filler tokens are drawn from [FILLER, vocab)
FILLER = 8
CUE_LEN = 16


def make_task(
    n_docs: int, seq_len: int, vocab: int, generator: torch.Generator, cue_len: int = CUE_LEN
) -> dict[str, torch.Tensor]:
    """`input_ids`, `attention_mask`, `global_attention_mask` `(n_docs, seq_len)` and `labels` `(n_docs,)`.

    Documents end at a random length in the last sixth (the rest is padding); cue `t`, a run of `cue_len`
    equal tokens, sits in the middle half of third `t` of the document; label 1 iff at least two of the three
    cues are `CUE_POS`. The filler comes from `vocab - FILLER` word types only, so an average over the document
    (what a random global token computes) already carries the cue counts, and a frozen random backbone can
    be steered by the prefix.
    """
    ids = torch.randint(FILLER, vocab, (n_docs, seq_len), generator=generator)
    lengths = torch.randint(seq_len - seq_len // 6, seq_len + 1, (n_docs,), generator=generator)
    cues = torch.randint(0, 2, (n_docs, 3), generator=generator)
    for i in range(n_docs):
        n = int(lengths[i])
        ids[i, 0], ids[i, n - 1] = BOS, EOS
        ids[i, n:] = PAD
        third = (n - 2) // 3
        for t in range(3):
            # The middle half of the third: cues stay about a sixth of the document apart.
            pos = (
                1
                + t * third
                + third // 4
                + int(torch.randint(0, max(1, third // 2 - cue_len), (1,), generator=generator))
            )
            ids[i, pos : pos + cue_len] = CUE_POS if cues[i, t] else CUE_NEG
    mask = (ids != PAD).long()
    glob = torch.zeros_like(ids)
    glob[:, 0] = 1  # <s> is global, as HF's classifier does by default
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "global_attention_mask": glob,
        "labels": (cues.sum(1) >= 2).long(),
    }


def tiny_classifier(max_length: int, *, vocab: int = 12, num_labels: int = 2, init_range: float = 0.125,
                    dropout: float = 0.0) -> torch.nn.Module:
    """The small random `LongformerForSequenceClassification` (hidden 64, 2 layers, 4 heads, window 32) of the
    demo and the examples. `max_length` counts the prefix slots; the position table also holds Longformer's
    offset of `padding_idx + 1` positions."""
    import transformers

    config = transformers.LongformerConfig(
        vocab_size=vocab,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        attention_window=32,
        max_position_embeddings=max_length + 4,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        num_labels=num_labels,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        initializer_range=init_range,
    )
    return transformers.LongformerForSequenceClassification(config)


def build_model(args) -> torch.nn.Module:
    """A small random `LongformerForSequenceClassification`, or `--model` loaded with a 2-label head."""
    import transformers

    if args.model:
        return transformers.AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    return tiny_classifier(args.seq_len + args.num_prefix, vocab=args.vocab, init_range=args.init_range)


def expected_calibration_error(probs: torch.Tensor, gold: torch.Tensor, bins: int = 10) -> float:
    """ECE of the top-class confidence, `probs (n, classes)`, over `bins` equal-width bins `(lo, hi]`: the sum over
    bins of |accuracy - mean confidence| times the bin's share of the data."""
    conf, pred = probs.float().max(dim=-1)
    correct = (pred == gold).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += inside.float().mean().item() * abs(correct[inside].mean().item() - conf[inside].mean().item())
    return ece


@torch.no_grad()
def evaluate(model, data: dict[str, torch.Tensor], batch_size: int) -> tuple[float, float]:
    """Accuracy and expected calibration error (10 bins) on `data`."""
    model.eval()
    probs = []
    n = len(data["labels"])
    for i in range(0, n, batch_size):
        batch = {k: v[i : i + batch_size] for k, v in data.items() if k != "labels"}
        probs.append(model(**batch).logits.float().softmax(-1).cpu())
    probs, gold = torch.cat(probs), data["labels"].cpu()
    return (probs.argmax(-1) == gold).float().mean().item(), expected_calibration_error(probs, gold)


def train_run(label: str, model, train, test, args, device) -> dict:
    """Accuracy before, training with a progress bar, accuracy and calibration error after, tokens/s and one step's
    peak memory."""
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    model.to(device)
    before, _ = evaluate(model, test, args.batch_size)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = get_linear_schedule_with_warmup(opt, max(1, args.steps // 10), args.steps)
    gen = torch.Generator().manual_seed(args.seed + 1)
    n_train = len(train["labels"])

    def step(batch) -> float:
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    def sample():
        idx = torch.randint(0, n_train, (args.batch_size,), generator=gen)
        return {k: v[idx] for k, v in train.items()}

    model.train()
    with peak_memory(device) as mem:  # one step only: the CPU tracker slows every op down
        step(sample())
    tokens, seconds = 0, 0.0
    bar = tqdm(range(args.steps - 1), desc=label, leave=False, dynamic_ncols=True)
    for _ in bar:
        batch = sample()
        t0 = time.perf_counter()
        loss = step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - t0
        tokens += batch["input_ids"].numel()
        bar.set_postfix(loss=f"{loss:.3f}")
    bar.close()
    after, ece = evaluate(model, test, args.batch_size)
    return {"label": label, "before": before, "after": after, "ece": ece, "tok_s": tokens / max(seconds, 1e-9),
            "peak": mem.peak}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m prefix_kernels demo", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--model", default=None, help="HF model name or path (default: a small random Longformer)")
    parser.add_argument("--method", choices=("propagation", "tuning"), default="propagation",
                        help="prefix-propagation (the paper's method) or prefix-tuning")
    parser.add_argument("--prefix-attention", choices=("joint", "separate"), default="joint",
                        help="the prefix inside each row's softmax, or normalised on its own by --kernel and added "
                             "with a learned scale per layer (the paper's kernel attention)")
    parser.add_argument("--kernel", choices=("exp", "rbf", "poly"), default=None,
                        help="the kernel of --prefix-attention separate (default there: exp)")
    parser.add_argument("--kernel-scale", choices=("scalar", "head"), default=None,
                        help="one scale per layer, or per layer and head (--prefix-attention separate; default "
                             "scalar)")
    parser.add_argument("--seq-len", type=positive_int, default=512, help="tokens per document (at least 12)")
    parser.add_argument("--steps", type=positive_int, default=100, help="optimizer steps (at least 2)")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="documents per step")
    parser.add_argument("--num-prefix", type=positive_int, default=8, help="P, the number of prefix slots")
    parser.add_argument("--lr", type=positive_float, default=1e-2, help="AdamW learning rate")
    parser.add_argument("--vocab", type=positive_int, default=12,
                        help=f"vocabulary of the random model ({FILLER} special tokens + filler types; at least "
                             f"{FILLER + 1})")
    parser.add_argument("--init-range", type=positive_float, default=0.125, help="weight std of the random model")
    parser.add_argument("--train-docs", type=positive_int, default=1024, help="training documents")
    parser.add_argument("--test-docs", type=positive_int, default=256, help="test documents")
    parser.add_argument("--device", type=device_arg, default=default_device(), help="cpu, cuda or cuda:N")
    parser.add_argument("--backend", default="auto", choices=("auto", *BACKEND_ORDER),
                        help="attention backend of the patched model ('auto' never picks the Triton interpreter)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the model and the training")
    parser.add_argument("--no-hf", action="store_true", help="skip the run with HF's own attention")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error(f"--steps must be at least 2, got {args.steps}")
    if args.seq_len < 3 * 4:
        parser.error(f"--seq-len must be at least 12 (three cues), got {args.seq_len}")
    if args.vocab <= FILLER:
        parser.error(f"--vocab must be at least {FILLER + 1} ({FILLER} special tokens and a filler), got {args.vocab}")
    if args.prefix_attention == "joint":
        given = [f"--{name.replace('_', '-')}" for name in ("kernel", "kernel_scale") if getattr(args, name)]
        if given:
            parser.error(f"{', '.join(given)} only apply with --prefix-attention separate")
    if args.backend != "auto":
        why = available_backends()[args.backend]
        if why is not None:
            parser.error(f"--backend {args.backend} is not available here: {why}")
    return args


def main(argv: list[str] | None = None) -> int:
    from ..hf.patching import unpatch_longformer
    from ..prefix import apply_prefix_propagation, apply_prefix_tuning

    args = parse_args(argv)
    device = args.device
    torch.manual_seed(args.seed)
    try:
        base = build_model(args)
    except (OSError, ValueError) as exc:  # no such path or Hub id, no network, not a Longformer checkpoint
        print(f"python -m prefix_kernels demo: error: --model {args.model}: {exc}", file=sys.stderr)
        return 2
    vocab = min(args.vocab, base.config.vocab_size)
    gen = torch.Generator().manual_seed(args.seed)
    train = make_task(args.train_docs, args.seq_len, vocab, gen)
    test = make_task(args.test_docs, args.seq_len, vocab, gen)
    train, test = ({k: v.to(device) for k, v in d.items()} for d in (train, test))

    backend = resolve_backend(device, torch.float32, args.backend)
    apply = apply_prefix_propagation if args.method == "propagation" else apply_prefix_tuning
    extra = {"pool_prefix": True} if args.method == "propagation" else {}
    attention = ""
    if args.prefix_attention == "separate":
        extra.update(prefix_attention="separate", kernel=args.kernel, kernel_scale=args.kernel_scale)
        kernel, scale = args.kernel or "exp", args.kernel_scale or "scalar"
        attention = f" (prefix attention separate, kernel {kernel}, scale {scale})"
    print(
        f"prefix-{args.method}{attention}, P={args.num_prefix}, {type(base).__name__} "
        f"({sum(p.numel() for p in base.parameters()):,} parameters, frozen), seq len {args.seq_len}, "
        f"batch {args.batch_size}, {args.steps} steps on {device}; backend {args.backend!r} -> {backend!r}"
    )
    print(
        f"task: the label is the majority of three {CUE_LEN}-token cue phrases, one in the middle half of each "
        f"third of the document (about {args.seq_len // 6} tokens apart or more)"
    )

    runs = []
    torch.manual_seed(args.seed)
    model = copy.deepcopy(base)
    prefix = apply(model, num_prefix=args.num_prefix, backend=args.backend, **extra)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"trainable: {trainable:,} parameters ({sum(p.numel() for p in prefix.parameters()):,} in the prefix)")
    runs.append(train_run(f"prefix_kernels ({backend})", model, train, test, args, device))
    if args.no_hf:
        pass
    elif args.method == "tuning":
        print("(HF's attention has no prefix keys/values: no HF run for prefix-tuning)")
    elif args.prefix_attention == "separate":
        print("(HF's attention has no separately normalised prefix: no HF run with --prefix-attention separate)")
    else:
        torch.manual_seed(args.seed)
        model = copy.deepcopy(base)
        apply(model, num_prefix=args.num_prefix, backend=args.backend, **extra)
        unpatch_longformer(model)  # same prefix plumbing, HF's eager attention
        runs.append(train_run("HF attention", model, train, test, args, device))

    width = max(len(r["label"]) for r in runs)
    print(f"{'':<{width}}  acc before  acc after  ECE after     tokens/s  peak memory (1 step)")
    for r in runs:
        print(
            f"{r['label']:<{width}}  {r['before']:>9.1%}  {r['after']:>9.1%}  {r['ece']:>9.4f}  {r['tok_s']:>11,.0f}"
            f"  {r['peak'] / 2**20:>10.1f} MiB"
        )
    return 0
