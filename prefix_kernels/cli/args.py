"""Argument types and the help format shared by `python -m prefix_kernels` (`report.py`) and its demo (`demo.py`):
a bad value is an argument error, not a traceback."""

from __future__ import annotations

import argparse

import torch


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written, every option's default after its help (a `None` default depends on the
    device: the help says how)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def _number(text: str, convert, admissible, kind: str):
    """`convert(text)`, an argument error unless it parses and `admissible(value)` holds; `kind` names what is
    expected ("a positive integer")."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
    if not admissible(value):
        raise argparse.ArgumentTypeError(f"must be {kind}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, lambda value: value >= 1, "a positive integer")


def positive_float(text: str) -> float:
    return _number(text, float, lambda value: 0 < value < float("inf"), "a positive number")


def finite_float(text: str) -> float:
    return _number(text, float, lambda value: abs(value) < float("inf"), "a finite number")


def device_arg(text: str) -> torch.device:
    """A device this machine has: `cpu`, `cuda` or `cuda:N` (checked here, not by a traceback later)."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a device: {text!r} (try 'cpu' or 'cuda')") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device is available on this machine (use 'cpu')")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text!r}: only 'cpu' and 'cuda' devices are supported")
    return device


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
