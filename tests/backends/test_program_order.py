"""`program_order` (tests/program_order.py) really reorders the programs of a launch under Triton's interpreter: a
kernel whose programs take a ticket from an atomic counter and write their id at it records the order they ran in.
If a Triton version stops visiting programs through `set_grid_dim` / `set_grid_idx`, this fails instead of the
reordered runs (`pytest --program-order ...`) silently running in grid order.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from helpers import triton_interpreted  # noqa: E402
from program_order import program_order  # noqa: E402

pytestmark = pytest.mark.skipif(not triton_interpreted(), reason="reorders the programs of Triton's interpreter; "
                                "compiled for a GPU, the GPU orders them")


@pytest.fixture(autouse=True)
def _grid_order():
    """These tests set the order themselves, whatever `--program-order` says."""
    with program_order("natural"):
        yield


@triton.jit
def _record_order(COUNTER, ORDER):
    pid = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    ticket = tl.atomic_add(COUNTER, 1)
    tl.store(ORDER + ticket, pid)


def _order(launches: int = 1) -> list[list[int]]:
    """The order the programs of a `(4, 3)` grid ran in, for each of `launches` launches."""
    runs = []
    for _ in range(launches):
        counter = torch.zeros(1, dtype=torch.int32)
        order = torch.full((12,), -1, dtype=torch.int32)
        _record_order[(4, 3)](counter, order)
        assert counter.item() == 12
        runs.append(order.tolist())
    return runs


def test_natural_order_is_grid_order():
    assert _order() == [list(range(12))]
    with program_order("natural") as state:
        assert _order() == [list(range(12))]
    assert state["launches"] == 0


def test_reversed_order_runs_the_last_program_first():
    with program_order("reversed") as state:
        assert _order(2) == [list(range(11, -1, -1))] * 2
    assert state["launches"] == 2
    assert _order() == [list(range(12))]  # restored on exit


def test_shuffled_order_is_a_seeded_permutation_per_launch():
    with program_order("shuffled", seed=3):
        first = _order(3)
    with program_order("shuffled", seed=3):
        assert _order(3) == first  # reproducible from the seed
    with program_order("shuffled", seed=4):
        assert _order(3) != first
    assert all(sorted(run) == list(range(12)) for run in first)  # every program once
    assert len({tuple(run) for run in first}) == 3 and list(range(12)) not in first  # a new order per launch


def test_an_unknown_order_is_an_error():
    with pytest.raises(ValueError, match="program order"), program_order("backwards"):
        pass
