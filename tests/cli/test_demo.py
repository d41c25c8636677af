"""The training demo and the paper-recipe example run end to end on tiny settings (CPU, reference backend); the
demo's expected calibration error against torchmetrics'."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from helpers import ROOT

pytest.importorskip("transformers")

from prefix_kernels.cli import demo  # noqa: E402

EXAMPLE = ROOT / "examples" / "train_prefix_propagation.py"
TINY = ["--device", "cpu", "--seq-len", "96", "--steps", "3", "--batch-size", "4", "--train-docs", "16",
        "--test-docs", "8"]


def test_task_labels_follow_the_cues():
    data = demo.make_task(32, 200, 12, torch.Generator().manual_seed(0))
    ids = data["input_ids"]
    assert ids.shape == (32, 200) and torch.equal(data["attention_mask"], (ids != demo.PAD).long())
    positives = (ids == demo.CUE_POS).sum(1) // demo.CUE_LEN
    negatives = (ids == demo.CUE_NEG).sum(1) // demo.CUE_LEN
    assert torch.equal(positives + negatives, torch.full((32,), 3))
    assert torch.equal(data["labels"], (positives >= 2).long())
    assert 0 < data["labels"].sum() < 32


@pytest.mark.parametrize("method", ["propagation", "tuning"])
def test_demo_runs(method, capsys):
    assert demo.main([*TINY, "--method", method, "--backend", "reference"]) == 0
    out = capsys.readouterr().out
    assert "prefix_kernels (reference)" in out and "tokens/s" in out and "ECE after" in out
    assert ("HF attention" in out) == (method == "propagation")


def test_demo_with_a_separate_prefix(capsys):
    """`--prefix-attention separate --kernel poly`: one run (HF's attention cannot compute it), with its accuracy
    and calibration error; a kernel without a separate prefix is an argument error."""
    assert demo.main([*TINY, "--prefix-attention", "separate", "--kernel", "poly", "--kernel-scale", "head",
                      "--backend", "reference"]) == 0
    out = capsys.readouterr().out
    assert "prefix attention separate, kernel poly, scale head" in out and "no HF run" in out
    row = next(line for line in out.splitlines() if line.startswith("prefix_kernels (reference)"))
    acc_before, acc_after, ece = row.split()[2:5]
    assert acc_after.endswith("%") and 0.0 <= float(ece) <= 1.0
    with pytest.raises(SystemExit):
        demo.parse_args(["--kernel", "rbf"])
    assert "--kernel only apply with --prefix-attention separate" in capsys.readouterr().err


@pytest.mark.parametrize("classes", [2, 3])
def test_expected_calibration_error_matches_torchmetrics(classes):
    """The demo's binned ECE (10 equal-width bins of the top-class confidence) against torchmetrics' L1 calibration
    error, on confidences away from the bin edges (where the two put a tie in different bins: `(lo, hi]` here,
    `[lo, hi)` there)."""
    torchmetrics = pytest.importorskip("torchmetrics")
    g = torch.Generator().manual_seed(classes)
    probs = torch.softmax(torch.randn(500, classes, generator=g, dtype=torch.float64) * 2, dim=-1)
    edge = (probs.max(-1).values * 10 - (probs.max(-1).values * 10).round()).abs() < 1e-3
    probs, gold = probs[~edge].float(), torch.randint(0, classes, (500,), generator=g)[~edge]
    metric = torchmetrics.classification.MulticlassCalibrationError(num_classes=classes, n_bins=10, norm="l1")
    want = metric(probs, gold).item()
    assert demo.expected_calibration_error(probs, gold, bins=10) == pytest.approx(want, abs=1e-6)
    assert want > 0.01


def test_example_synthetic(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("train_prefix_propagation", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    args = ["--device", "cpu", "--synthetic", "--max-steps", "3", "--batch-size", "8", "--micro-batch", "4",
            "--max-length", "96"]
    result = example.train(example.parse_args([*args, "--backend", "reference", "--output-dir", str(tmp_path)]))
    assert (tmp_path / "prefix.safetensors").is_file()
    for split in ("validation", "test"):
        assert {"micro_f1", "macro_f1", "binary_f1", "ece"} <= set(result[split])
        assert 0.0 <= result[split]["ece"] <= 1.0
    assert "test:" in capsys.readouterr().out


def test_calibration_and_f1_metrics():
    spec = importlib.util.spec_from_file_location("train_prefix_propagation", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    probs = torch.tensor([[0.86, 0.14], [0.84, 0.16], [0.35, 0.65], [0.45, 0.55]])
    gold = torch.tensor([0, 1, 1, 1])
    # bin (0.8, 0.9]: half the data, accuracy 0.5 at confidence 0.85; then one right answer each at 0.65, 0.55
    want = 0.5 * abs(0.5 - 0.85) + 0.25 * (1 - 0.65) + 0.25 * (1 - 0.55)
    assert example.expected_calibration_error(probs, gold, bins=10) == pytest.approx(want)
    scores = example.f1_scores(probs.argmax(-1), gold, 2)
    assert scores["micro_f1"] == pytest.approx(0.75)
    assert scores["binary_f1"] == pytest.approx(2 * 2 / (2 * 2 + 0 + 1))
