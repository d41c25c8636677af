"""The training demo and the paper-recipe example run end to end on tiny settings (CPU, reference backend)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from helpers import ROOT

pytest.importorskip("transformers")

import prefix_kernels as pk  # noqa: E402
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
    assert "prefix_kernels (reference)" in out and "tokens/s" in out
    assert ("HF attention" in out) == (method == "propagation")


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


# ------------------------------------------------------------------------------------------------------------
# Command lines
# ------------------------------------------------------------------------------------------------------------


def run_cli(argv, capsys) -> tuple[int, str, str]:
    from prefix_kernels.__main__ import main

    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("prefix", [[], ["demo"]])
def test_help_lists_every_option_with_its_default(prefix, capsys):
    code, out, _ = run_cli([*prefix, "--help"], capsys)
    assert code == 0
    assert "--backend" in out and "--device" in out and "--seq-len" in out
    assert "(default: auto)" in out or "(default: all)" in out
    options = [line.split()[0] for line in out.splitlines() if line.strip().startswith("--")]
    assert len(options) >= 4


@pytest.mark.parametrize("prefix", [[], ["demo"]])
@pytest.mark.parametrize("args, message", [
    (["--seq-len", "0"], "--seq-len: must be a positive integer, got 0"),
    (["--seq-len", "-5"], "--seq-len: must be a positive integer, got -5"),
    (["--device", "gpu0"], "--device: not a device: 'gpu0'"),
    (["--backend", "nope"], "--backend: invalid choice: 'nope'"),
])
def test_bad_arguments_get_a_clear_error(prefix, args, message, capsys):
    code, out, err = run_cli([*prefix, *args], capsys)
    assert code == 2 and message in err and "Traceback" not in err + out


@pytest.mark.parametrize("prefix", [[], ["demo"]])
def test_cuda_without_cuda_is_an_argument_error(prefix, capsys):
    if torch.cuda.is_available():
        pytest.skip("checks the error on a machine without CUDA; this one has CUDA")
    code, _, err = run_cli([*prefix, "--device", "cuda"], capsys)
    assert code == 2 and "no CUDA device is available" in err


def test_unavailable_backend_and_odd_length_are_argument_errors(capsys):
    missing = [name for name, why in pk.available_backends().items() if why is not None]
    if missing:
        code, _, err = run_cli(["--backend", missing[0]], capsys)
        assert code == 2 and f"--backend {missing[0]} is not available here" in err
    code, _, err = run_cli(["--device", "cpu", "--seq-len", "100"], capsys)
    assert code == 2 and "--seq-len must be a multiple of 128" in err
    code, _, err = run_cli(["demo", "--steps", "1"], capsys)
    assert code == 2 and "--steps must be at least 2" in err


def test_layer_comparison_with_a_chosen_backend(capsys):
    code, out, _ = run_cli(["--device", "cpu", "--seq-len", "128", "--repeat", "1", "--backend", "reference"], capsys)
    assert code == 0
    rows = [line.split()[0] for line in out.splitlines()[out.splitlines().index(
        next(line for line in out.splitlines() if line.startswith("implementation"))) + 1:]]
    assert rows == ["hf", "reference"]


def test_default_comparison_leaves_out_the_triton_interpreter(capsys):
    code, out, _ = run_cli(["--device", "cpu", "--seq-len", "128", "--repeat", "1"], capsys)
    assert code == 0
    table = out[out.index("implementation"):]
    skipped = pk.auto_skips()
    for name, why in pk.available_backends().items():
        assert (f"\n{name} " in table) == (why is None and name not in skipped), name
    if "triton" in skipped:
        assert "interpreter" in out[: out.index("implementation")]
