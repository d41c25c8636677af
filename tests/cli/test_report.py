"""The command line, `python -m prefix_kernels [demo]` (`cli/report.py`, `cli/args.py`): every option in the help
with its default, bad values as argument errors (no traceback), and the layer comparison with HF."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import prefix_kernels as pk  # noqa: E402


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
