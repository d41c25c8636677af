"""Programs in a GPU's order under Triton's interpreter, for tests.

Triton's interpreter runs the programs of a launch one after another in grid order (`GridExecutor.__call__` in
`triton/runtime/interpreter.py`: `set_grid_dim`, then for every `(x, y, z)` in order `set_grid_idx` and the
kernel). A GPU runs them in any order and at once, so a kernel whose result depends on one program running
before another passes the interpreter tests by luck. `program_order("reversed")` runs every launch's programs
last to first; `program_order("shuffled", seed)` in a random order drawn per launch from a generator seeded once
per context. Both renumber the programs the interpreter visits in order: when the loop asks for program `k`
(grid order), program `order[k]` runs; each program still runs once, with its own `program_id`.

Used by `conftest.py` (`pytest --program-order reversed|shuffled`: every test in that order) and checked by
`backends/test_program_order.py`, which fails if a Triton version stops visiting programs this way.
"""

from __future__ import annotations

import contextlib
import itertools
import random

ORDERS = ("natural", "reversed", "shuffled")


@contextlib.contextmanager
def program_order(order: str, seed: int = 0):
    """Within it, Triton's interpreter runs the programs of every launch in `order` (see the module docstring).
    Yields a dict whose `"launches"` counts the launches it reordered."""
    if order not in ORDERS:
        raise ValueError(f"program order must be one of {ORDERS}, got {order!r}")
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    names = ("set_grid_dim", "set_grid_idx")
    # The class's methods: an inner context overrides an outer one (`natural` inside `reversed` is grid order).
    set_grid_dim, set_grid_idx = (getattr(type(builder), name).__get__(builder) for name in names)
    outer = {name: builder.__dict__.pop(name) for name in names if name in builder.__dict__}
    rng = random.Random(seed)
    state = {"launches": 0, "order": None, "dim": (1, 1, 1)}

    def reorder_grid_dim(nx, ny, nz):
        set_grid_dim(nx, ny, nz)
        programs = list(itertools.product(range(nx), range(ny), range(nz)))
        if order == "reversed":
            programs.reverse()
        else:
            rng.shuffle(programs)
        state.update(order=programs, dim=(nx, ny, nz))
        state["launches"] += 1

    def reorder_grid_idx(x, y, z):
        _, ny, nz = state["dim"]
        set_grid_idx(*state["order"][(x * ny + y) * nz + z])

    if order != "natural":
        builder.set_grid_dim, builder.set_grid_idx = reorder_grid_dim, reorder_grid_idx
    try:
        yield state
    finally:
        for name in names:  # back to the outer context's (instance attributes), else the class's methods
            builder.__dict__.pop(name, None)
        builder.__dict__.update(outer)
