"""Packed documents against padded batches: training throughput, peak memory and the loss per document.

A 4-layer `LongformerForSequenceClassification` (hidden 256, 4 heads, `attention_window` 256 (HF's two-sided
number: the op's one-sided window is 128), vocabulary 50265), patched, trained with AdamW on `--docs` random documents
whose lengths follow a log-normal distribution (median 600, sigma `--sigma`, capped at 4096), about 4096 real tokens
per step, one epoch per batching:

* `packed`: the documents in random order packed first-fit into rows of at most 4096 tokens (`PackingCollator`), one
  row per step, one logit row per document (`DocumentClassifier`);
* `padded`: consecutive documents in random order up to 4096 real tokens per step, padded to the longest;
* `grouped`: the same after HF's `group_by_length` ordering (megabatches of `--megabatch` documents sorted by length,
  longest first), padded to the longest.

Each batching runs in its own process (peak memory is the process's peak resident set); the report gives real tokens
per second, the speed-up of packing, peak memory, and the largest difference of the loss per document between packed
rows and padded batches (eval mode, the same initial weights). `--interleave` also trains the three in turns in one
more process (a step of each, then the next), so that a machine whose speed drifts between the runs (a shared one)
slows all three alike, and quotes that speed-up too. Takes minutes on a CPU:

    python benchmarks/packing.py [--docs 256] [--device cpu] [--interleave] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

MAX_TOKENS = 4096
MODEL = dict(vocab_size=50265, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
             attention_window=256, max_position_embeddings=MAX_TOKENS + 2, pad_token_id=1, num_labels=2,
             type_vocab_size=1)


def lengths(n: int, sigma: float, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    x = torch.exp(torch.log(torch.tensor(600.0)) + sigma * torch.randn(n, generator=g, dtype=torch.float64))
    return [int(v) for v in x.round().clamp(8, MAX_TOKENS)]


def documents(args) -> list[dict]:
    g = torch.Generator().manual_seed(args.seed + 1)
    docs = []
    for n in lengths(args.docs, args.sigma, args.seed):
        ids = torch.randint(3, MODEL["vocab_size"], (n,), generator=g)
        ids[0] = 0  # <s>
        docs.append({"input_ids": ids.tolist(), "label": int(ids[1:].float().mean() > MODEL["vocab_size"] / 2)})
    return docs


def order(args, docs: list[dict]) -> list[int]:
    return torch.randperm(len(docs), generator=torch.Generator().manual_seed(args.seed + 2)).tolist()


def steps(args, kind: str, docs: list[dict]) -> list[list[int]]:
    """The documents of each step."""
    from prefix_kernels.hf.packing import PackingCollator

    idx = order(args, docs)
    if kind == "packed":
        places = PackingCollator(MAX_TOKENS).pack([len(docs[i]["input_ids"]) for i in idx])
        rows: dict[int, list[int]] = {}
        for i, (row, _) in zip(idx, places, strict=True):
            rows.setdefault(row, []).append(i)
        return list(rows.values())
    if kind == "grouped":  # HF's LengthGroupedSampler: megabatches sorted by length, longest first
        mb = args.megabatch
        idx = [i for s in range(0, len(idx), mb)
               for i in sorted(idx[s : s + mb], key=lambda i: -len(docs[i]["input_ids"]))]
    out, cur, used = [], [], 0
    for i in idx:
        n = len(docs[i]["input_ids"])
        if cur and used + n > MAX_TOKENS:
            out.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    return [*out, cur] if cur else out


def padded_batch(docs: list[dict], pick: list[int]) -> dict:
    n = max(len(docs[i]["input_ids"]) for i in pick)
    ids = torch.full((len(pick), n), MODEL["pad_token_id"], dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, i in enumerate(pick):
        t = docs[i]["input_ids"]
        ids[r, : len(t)] = torch.tensor(t)
        mask[r, : len(t)] = 1
    glob = torch.zeros_like(ids)
    glob[:, 0] = 1
    return {"input_ids": ids, "attention_mask": mask, "global_attention_mask": glob,
            "labels": torch.tensor([docs[i]["label"] for i in pick])}


def batch_for(kind: str, docs: list[dict], pick: list[int]) -> dict:
    from prefix_kernels.hf.packing import PackingCollator

    if kind == "packed":
        return PackingCollator(MAX_TOKENS, pad_to_multiple_of=MODEL["attention_window"])([docs[i] for i in pick])
    return padded_batch(docs, pick)


def build(device: str):
    import transformers

    import prefix_kernels as pk

    torch.manual_seed(0)
    model = transformers.LongformerForSequenceClassification(transformers.LongformerConfig(**MODEL))
    pk.patch_longformer(model)
    return pk.DocumentClassifier(model).to(device)


def run_one(args, kind: str) -> dict:
    docs = documents(args)
    plan = steps(args, kind, docs)
    model = build(args.device)
    # The loss per document at the initial weights, without dropout, on the first documents of the plan.
    model.eval()
    losses = {}
    target = set(order(args, docs)[: args.loss_docs])
    with torch.no_grad():
        for pick in plan:
            if not target & set(pick):
                continue
            batch = {k: v.to(args.device) for k, v in batch_for(kind, docs, pick).items()}
            labels = batch.pop("labels")
            logits = model(**batch).logits
            each = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")
            losses.update({i: float(v) for i, v in zip(pick, each.tolist(), strict=True) if i in target})
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    real = padded = 0
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    warm = plan[: args.warmup]
    for pick in warm:  # not timed
        out = model(**{k: v.to(args.device) for k, v in batch_for(kind, docs, pick).items()})
        out.loss.backward()
        opt.zero_grad(set_to_none=True)
    sync()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for pick in plan:
        batch = batch_for(kind, docs, pick)
        real += int(batch["attention_mask"].sum())
        padded += batch["input_ids"].numel()
        out = model(**{k: v.to(args.device) for k, v in batch.items()})
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if args.device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"kind": kind, "steps": len(plan), "real_tokens": real, "row_tokens": padded, "seconds": seconds,
            "tokens_per_s": real / seconds, "peak_bytes": peak, "losses": losses}


def run_interleaved(args) -> dict:
    """The three batchings' training steps in one process, in turns (a packed step, a padded one, a grouped one, ...),
    each on its own copy of the model and optimizer: a slower or faster stretch of the machine falls on all three
    alike. Seconds of training per batching: the steps `run_one` times, after the same untimed warm-up (`--warmup`
    steps each), without its loss pass."""
    docs = documents(args)
    kinds = ("packed", "padded", "grouped")
    plans = {kind: steps(args, kind, docs) for kind in kinds}
    models = {kind: build(args.device).train() for kind in kinds}
    opts = {kind: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
            for kind, m in models.items()}
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    for kind in kinds:  # not timed, as in `run_one`
        for pick in plans[kind][: args.warmup]:
            out = models[kind](**{k: v.to(args.device) for k, v in batch_for(kind, docs, pick).items()})
            out.loss.backward()
            opts[kind].zero_grad(set_to_none=True)
    seconds = dict.fromkeys(kinds, 0.0)
    for i in range(max(len(plan) for plan in plans.values())):
        for kind in kinds:
            if i >= len(plans[kind]):
                continue
            sync()
            start = time.perf_counter()
            batch = batch_for(kind, docs, plans[kind][i])
            out = models[kind](**{k: v.to(args.device) for k, v in batch.items()})
            out.loss.backward()
            opts[kind].step()
            opts[kind].zero_grad(set_to_none=True)
            sync()
            seconds[kind] += time.perf_counter() - start
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=256)
    ap.add_argument("--sigma", type=float, default=0.8, help="log-normal sigma of the document lengths")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--megabatch", type=int, default=64, help="documents per length-sorted megabatch (grouped)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (their gradients are dropped)")
    ap.add_argument("--loss-docs", type=int, default=32, help="documents whose loss is compared")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--interleave", action="store_true",
                    help="also time the three batchings in turns in one process, and quote that speed-up")
    ap.add_argument("--one", choices=("packed", "padded", "grouped", "interleaved"), help=argparse.SUPPRESS)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(run_interleaved(args) if args.one == "interleaved" else run_one(args, args.one)))
        return
    results = {}
    for kind in ("packed", "padded", "grouped", *(("interleaved",) if args.interleave else ())):
        argv = sys.argv[1:]
        keep = [a for i, a in enumerate(argv) if a != "--json" and not (i and argv[i - 1] == "--json")]
        cmd = [sys.executable, __file__, "--one", kind, *keep]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ)
        results[kind] = json.loads(done.stdout.strip().splitlines()[-1])
        r = results[kind]
        if kind == "interleaved":
            print("in turns, one process: " + ", ".join(f"{k} {v:.1f} s" for k, v in r.items()), flush=True)
            continue
        print(f"{kind:8s} steps {r['steps']:4d}  real tokens {r['real_tokens']:7d}  row tokens {r['row_tokens']:7d}  "
              f"{r['seconds']:7.1f} s  {r['tokens_per_s']:8.0f} real tok/s  peak {r['peak_bytes'] / 2**20:7.0f} MiB",
              flush=True)
    packed = results["packed"]
    for kind in ("padded", "grouped"):
        other = results[kind]
        common = set(packed["losses"]) & set(other["losses"])
        diff = max((abs(packed["losses"][i] - other["losses"][i]) for i in common), default=float("nan"))
        if args.interleave:
            turns = results["interleaved"]
            print(f"packed vs {kind}, in turns: {turns[kind] / turns['packed']:.2f}x real tokens/s")
        print(f"packed vs {kind}: {packed['tokens_per_s'] / other['tokens_per_s']:.2f}x real tokens/s, peak memory "
              f"{packed['peak_bytes'] / other['peak_bytes']:.2f}x, loss per document max |diff| {diff:.2e} over "
              f"{len(common)} documents")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
