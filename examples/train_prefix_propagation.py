"""Prefix-propagation on long-document classification, the recipe of Li et al. (ACL 2023, arXiv 2305.12086).

    python examples/train_prefix_propagation.py --task arxiv          # ccdv/arxiv-classification, 11 classes
    python examples/train_prefix_propagation.py --task hyperpartisan  # binary, 80/10/10 split of 'byarticle'
    python examples/train_prefix_propagation.py --task 20news         # SetFit/20_newsgroups, 20 classes
    python examples/train_prefix_propagation.py --synthetic           # offline: small random model, few steps

Recipe: longformer-base-4096, P = 8 prefix slots, backbone frozen, prefix and classification head trained with
AdamW, linear warmup over the first 10% of the steps then linear decay, an effective batch of 32 reached by
gradient accumulation, fp32 (the paper's lr grid is {5e-4 ... 5e-2}). The head pools prefix slot 0, as the
paper's classifier did. Reported on the validation and test sets: micro F1 (= accuracy for single-label
tasks), binary F1 (for two classes) or macro F1, and the expected calibration error (ECE, equal-width bins).
The best validation prefix is saved with `save_prefix` (only the trainable parameters).

`datasets` and the tokenizer are imported only for the real tasks; `--synthetic` needs neither.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

import prefix_kernels as pk
from prefix_kernels.attention import BACKEND_ORDER
from prefix_kernels.cli.demo import expected_calibration_error  # the demo's binned ECE, (lo, hi] equal-width bins

# task -> (HF dataset, config, text field, label field, split names (train, validation, test))
TASKS = {
    "arxiv": ("ccdv/arxiv-classification", None, "text", "label", ("train", "validation", "test")),
    "hyperpartisan": ("hyperpartisan_news_detection", "byarticle", "text", "hyperpartisan", ("train", None, None)),
    "20news": ("SetFit/20_newsgroups", None, "text", "label", ("train", None, "test")),
}


# ------------------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------------------


def f1_scores(pred: torch.Tensor, gold: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Micro F1 (= accuracy for single-label data), macro F1, and for two classes the F1 of class 1."""
    out = {"micro_f1": (pred == gold).float().mean().item()}
    f1 = []
    for c in range(num_classes):
        tp = ((pred == c) & (gold == c)).sum().item()
        fp = ((pred == c) & (gold != c)).sum().item()
        fn = ((pred != c) & (gold == c)).sum().item()
        f1.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    out["macro_f1"] = sum(f1) / num_classes
    if num_classes == 2:
        out["binary_f1"] = f1[1]
    return out


# ------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------


def load_real_task(args) -> tuple[dict, int]:
    """Tokenized `{"train"|"validation"|"test": {"input_ids", "attention_mask", "labels"}}` and the class count."""
    from datasets import load_dataset
    from transformers import AutoTokenizer

    name, config, text_key, label_key, splits = TASKS[args.task]
    raw = load_dataset(args.dataset_name or name, config)
    train = raw[splits[0]]
    if splits[1] is None:  # carve a validation set (and for hyperpartisan a test set) out of train
        parts = train.train_test_split(test_size=0.2 if splits[2] is None else 0.1, seed=args.seed)
        train, rest = parts["train"], parts["test"]
        if splits[2] is None:
            halves = rest.train_test_split(test_size=0.5, seed=args.seed)
            val, test = halves["train"], halves["test"]
        else:
            val, test = rest, raw[splits[2]]
    else:
        val, test = raw[splits[1]], raw[splits[2]]
    tok = AutoTokenizer.from_pretrained(args.model)
    out = {}
    for split, ds in (("train", train), ("validation", val), ("test", test)):
        enc = tok(list(ds[text_key]), truncation=True, max_length=args.max_length, padding="max_length")
        out[split] = {
            "input_ids": torch.tensor(enc["input_ids"]),
            "attention_mask": torch.tensor(enc["attention_mask"]),
            "labels": torch.tensor([int(x) for x in ds[label_key]]),
        }
    num_classes = int(max(int(out["train"]["labels"].max()), int(out["test"]["labels"].max())) + 1)
    return out, num_classes


def synthetic_task(args) -> tuple[dict, int]:
    """The demo's long-document task (`prefix_kernels.demo.make_task`): 2 classes, no download."""
    from prefix_kernels.cli.demo import make_task

    g = torch.Generator().manual_seed(args.seed)
    sizes = {"train": args.synthetic_docs, "validation": 64, "test": 64}
    data = {split: make_task(n, args.max_length, 12, g) for split, n in sizes.items()}
    for d in data.values():
        d.pop("global_attention_mask")
    return data, 2


def build_model(args, num_classes: int):
    import transformers

    if not args.synthetic:
        return transformers.AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=num_classes)
    from prefix_kernels.cli.demo import tiny_classifier

    # HF's default dropout (0.1), as in fine-tuning.
    return tiny_classifier(args.max_length + args.num_prefix, num_labels=num_classes, dropout=0.1)


# ------------------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------------------


def batches(data: dict, batch_size: int, generator: torch.Generator | None = None):
    n = len(data["labels"])
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for i in range(0, n, batch_size):
        idx = order[i : i + batch_size]
        yield {k: v[idx] for k, v in data.items()}


def with_global_cls(batch: dict, device) -> dict:
    """Move to `device` and give `<s>` global attention, as HF's classifier does by default."""
    batch = {k: v.to(device) for k, v in batch.items()}
    glob = torch.zeros_like(batch["input_ids"])
    glob[:, 0] = 1
    batch["global_attention_mask"] = glob
    return batch


@torch.no_grad()
def evaluate(model, data: dict, args, num_classes: int, device) -> dict[str, float]:
    model.eval()
    probs, gold = [], []
    for batch in batches(data, args.micro_batch):
        batch = with_global_cls(batch, device)
        labels = batch.pop("labels")
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            logits = model(**batch).logits
        probs.append(logits.float().softmax(-1).cpu())
        gold.append(labels.cpu())
    probs, gold = torch.cat(probs), torch.cat(gold)
    metrics = f1_scores(probs.argmax(-1), gold, num_classes)
    metrics["ece"] = expected_calibration_error(probs, gold, args.ece_bins)
    return metrics


def fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def train(args) -> dict[str, dict[str, float]]:
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    data, num_classes = synthetic_task(args) if args.synthetic else load_real_task(args)
    model = build_model(args, num_classes)
    prefix = pk.apply_prefix_propagation(
        model, num_prefix=args.num_prefix, pool_prefix=args.pool_prefix, backend=args.backend
    )
    model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    print(f"{sum(p.numel() for p in trainable):,} trainable parameters ({prefix.prefix.numel():,} in the prefix)")

    accumulation = max(1, args.batch_size // args.micro_batch)
    steps_per_epoch = math.ceil(len(data["train"]["labels"]) / (args.micro_batch * accumulation))
    total = args.max_steps or steps_per_epoch * args.epochs
    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    sched = get_linear_schedule_with_warmup(opt, int(args.warmup * total), total)
    gen = torch.Generator().manual_seed(args.seed)
    best, best_metrics, step = -1.0, {}, 0
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=total, desc="train", dynamic_ncols=True)
    t0 = time.perf_counter()
    while step < total:
        model.train()
        opt.zero_grad(set_to_none=True)  # a partial accumulation left from the last epoch is dropped
        micro = 0
        for batch in batches(data["train"], args.micro_batch, gen):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                loss = model(**with_global_cls(batch, device)).loss / accumulation
            loss.backward()
            micro += 1
            if micro % accumulation:
                continue
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item() * accumulation:.3f}")
            if step >= total:
                break
        val = evaluate(model, data["validation"], args, num_classes, device)
        key = "binary_f1" if num_classes == 2 and not args.synthetic else "micro_f1"
        bar.write(f"step {step}: validation {fmt(val)}")
        if val[key] > best:
            best, best_metrics = val[key], val
            pk.save_prefix(model, out_dir / "prefix.safetensors")
    bar.close()
    print(f"trained {step} steps in {time.perf_counter() - t0:.1f} s")
    pk.load_prefix(model, out_dir / "prefix.safetensors")
    test = evaluate(model, data["test"], args, num_classes, device)
    print(f"best validation: {fmt(best_metrics)}")
    print(f"test:            {fmt(test)}")
    return {"validation": best_metrics, "test": test}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=sorted(TASKS), default="hyperpartisan")
    p.add_argument("--dataset-name", default=None, help="override the task's HF dataset name")
    p.add_argument("--synthetic", action="store_true", help="offline run: small random model, synthetic task")
    p.add_argument("--model", default="allenai/longformer-base-4096")
    p.add_argument("--max-length", type=int, default=4096)
    p.add_argument("--num-prefix", type=int, default=8)
    p.add_argument("--pool-prefix", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of the steps")
    p.add_argument("--batch-size", type=int, default=32, help="effective batch, by gradient accumulation")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many optimizer steps (0: epochs)")
    p.add_argument("--ece-bins", type=int, default=10)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (the paper trained in fp32)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="auto", choices=("auto", *BACKEND_ORDER))
    p.add_argument("--output-dir", default="prefix_propagation_out")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--synthetic-docs", type=int, default=256)
    args = p.parse_args(argv)
    if args.synthetic and args.max_length == 4096:
        args.max_length = 256  # small enough for a CPU
    return args


def main(argv: list[str] | None = None) -> int:
    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
