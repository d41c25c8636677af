"""The Triton launchers without a GPU and without running a kernel: the device guard around every launch, the
refusals `cannot_serve` gives on a GPU (device properties faked), and what the launchers hand the kernels.

Each kernel is replaced by a stub that records its launch (grid, arguments, the device the guard had made current
at that moment), so these tests run on any machine and need no CUDA: a one-GPU or CPU-only machine cannot show a
launch on the wrong device itself.
"""

from __future__ import annotations

import contextlib
import importlib
import types

import pytest
import torch

pytest.importorskip("triton")

from helpers import make_inputs, skip_unless_runs  # noqa: E402

from prefix_kernels.backends.triton import launch  # noqa: E402
from prefix_kernels.core.checks import check_inputs  # noqa: E402
from prefix_kernels.core.masks import global_index  # noqa: E402

KERNELS = ("_attention_fwd_kernel", "_global_rows_merge_kernel", "_bwd_preprocess_kernel", "_attention_bwd_kernel",
           "_bwd_finalize_kernel")


class _Recorder:
    """Stands in for the launchers' device guard (`launch._on_device`) and for every kernel: records which device
    the guard made current when each kernel was launched (`None`: outside any guard)."""

    def __init__(self):
        self.current = None
        self.entered = []
        self.launches = []  # (kernel name, device current at launch, grid, positional arguments)

    @contextlib.contextmanager
    def guard(self, device):
        self.entered.append(device)
        previous, self.current = self.current, device
        try:
            yield
        finally:
            self.current = previous

    def kernel(self, name):
        recorder = self

        class _Stub:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    recorder.launches.append((name, recorder.current, grid, args))
                return run

        return _Stub()


@pytest.fixture
def recorder(monkeypatch):
    rec = _Recorder()
    monkeypatch.setattr(launch, "_on_device", rec.guard)
    for name in KERNELS:
        monkeypatch.setattr(launch, name, rec.kernel(name))
    return rec


def _arg(recorder, kernel, name):
    """Argument `name` of the one launch of `kernel` that `recorder` saw (by the real kernel's parameter list)."""
    # `importlib`: the package's `forward` / `backward` names are the launchers, not the kernel modules.
    modules = [importlib.import_module(f"prefix_kernels.backends.triton.{m}") for m in ("forward", "backward")]
    real = next(getattr(m, kernel) for m in modules if hasattr(m, kernel))
    (args,) = [args for launched, _, _, args in recorder.launches if launched == kernel]
    return args[real.arg_names.index(name)]


def _launch_both(t, masks, window=3, dropout_p=0.0, grad_out=None):
    """`launch.forward` then `launch.backward` on the op's normalized arguments, as the custom op calls them
    (without `q_global`: local rows only)."""
    local_rows_only = "q_global" not in t and "is_global" in masks
    a = check_inputs(**t, **masks, window=window, local_rows_only=local_rows_only)
    gidx, gcnt, gmax = global_index(a.is_global)
    prefix_k, prefix_v = a.prefix_k, a.prefix_v
    if prefix_k is not None and prefix_k.dim() == 3:
        prefix_k, prefix_v = (p.unsqueeze(0).expand(a.q.shape[0], -1, -1, -1) for p in (prefix_k, prefix_v))
    tensors = (a.q, a.k, a.v, a.q_global, a.k_global, a.v_global, prefix_k, prefix_v, a.key_padding_mask, gidx,
               gcnt)
    kw = dict(window=a.window, scale=a.softmax_scale, dropout_p=dropout_p, seed=1, max_global=gmax)
    out, lse = launch.forward(*tensors, **kw)
    grad_out = torch.zeros_like(out) if grad_out is None else grad_out
    launch.backward(grad_out, *tensors, out, lse, **kw)


def test_every_kernel_launch_runs_inside_the_device_guard(recorder):
    """Forward and backward, with global rows, local rows only, a prefix and dropout: every kernel is launched
    while the guard holds the inputs' device."""
    t, masks = make_inputs(2, 40, 2, 16, prefix=3, n_global={0: [0, 9], 1: [20]}, pad={1: [38, 39]})
    _launch_both(t, masks, dropout_p=0.1)
    local = {k: v for k, v in t.items() if not k.endswith("_global")}
    _launch_both(local, masks)
    assert {name for name, *_ in recorder.launches} == set(KERNELS)
    outside = [name for name, device, *_ in recorder.launches if device != t["q"].device]
    assert not outside, f"launched outside the device guard: {outside}"
    assert recorder.entered == [t["q"].device] * 4  # one guard per launcher call


def test_the_device_guard_makes_the_inputs_device_current_and_is_a_no_op_on_the_cpu(monkeypatch):
    guard = launch._on_device(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1  # not entered: no CUDA call here

    def no_cuda(*args, **kwargs):
        raise AssertionError("the guard touched CUDA for CPU tensors")

    monkeypatch.setattr(torch.cuda, "device", no_cuda)
    with launch._on_device(torch.device("cpu")):
        pass


def test_the_output_gradient_gets_a_row_stride_the_tile_offsets_hold(recorder):
    """`cannot_serve` checks the inputs' row strides; the output gradient, which autograd hands the backward, is
    copied when its rows are 2**24 elements apart or more (meta tensors: no memory behind the strides)."""
    b, n, h, d = 1, 4, 1, 16
    t = {name: torch.empty(b, n, h, d, device="meta") for name in ("q", "k", "v")}
    big = launch.ROW_STRIDE_LIMIT
    grad_out = torch.empty_strided((b, n, h, d), (n * big, big, d, 1), device="meta")
    _launch_both(t, {}, grad_out=grad_out)
    do = _arg(recorder, "_attention_bwd_kernel", "DO")
    assert do.shape == grad_out.shape and do.stride(1) < big
    assert _arg(recorder, "_bwd_preprocess_kernel", "DO").stride(1) < big


def test_a_window_beyond_the_sequence_is_clamped_to_it(recorder):
    """A window of 2**31 - 1 reaches the kernels as N: the same key sets, and no int32 overflow in the band bounds
    (`start + BLOCK + window`)."""
    t, masks = make_inputs(1, 24, 1, 16, n_global={0: [5]})
    _launch_both(t, masks, window=2**31 - 1)
    assert _arg(recorder, "_attention_fwd_kernel", "window") == 24
    assert _arg(recorder, "_attention_bwd_kernel", "window") == 24


# ------------------------------------------------------------------------------------------------------------
# Refusals on a GPU, device properties faked
# ------------------------------------------------------------------------------------------------------------

# name: (major, minor, shared memory per block with opt-in)
GPUS = {"H100": (9, 0, 232448), "A100": (8, 0, 166912), "RTX 4090": (8, 9, 101376), "RTX 5090": (12, 0, 101376),
        "T4": (7, 5, 65536)}


@pytest.fixture
def fake_gpu(monkeypatch):
    """`fake_gpu(name)`: `cannot_serve` sees compiled kernels (no interpreter) and device 0 with the properties of
    `name`; returns how many times the properties were read."""
    reads = []
    monkeypatch.setattr(launch, "INTERPRET", False)
    launch._device_limits.cache_clear()

    def install(name):
        major, minor, shared = GPUS[name]
        props = types.SimpleNamespace(major=major, minor=minor, shared_memory_per_block_optin=shared)

        def get_device_properties(index):
            reads.append(index)
            return props

        monkeypatch.setattr(torch.cuda, "get_device_properties", get_device_properties)
        launch._device_limits.cache_clear()
        return reads

    yield install
    launch._device_limits.cache_clear()


def _args(head_dim, dtype=torch.bfloat16, index=0):
    """What `cannot_serve` reads of a call on `cuda:index` (meta tensors stand for the CUDA ones)."""
    q = torch.empty(1, 64, 2, head_dim, dtype=dtype, device="meta")
    return types.SimpleNamespace(dtype=dtype, device=torch.device("cuda", index), shape=tuple(q.shape), q=q, k=q,
                                 v=q, q_global=None, k_global=None, v_global=None, prefix_k=None, prefix_v=None)


@pytest.mark.parametrize("gpu", ["H100", "A100", "RTX 4090"])
@pytest.mark.parametrize("head_dim", [160, 192, 256])
def test_head_dims_above_128_are_refused_with_the_reason(fake_gpu, gpu, head_dim):
    """No tile configuration serves D > 128 (the widened D = 128 tiles spill and, in 16 bits on sm_90, exceed the
    shared memory per block): refused on every GPU, the reason naming the GPU's limits, so `auto` moves on."""
    fake_gpu(gpu)
    major, minor, shared = GPUS[gpu]
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        why = launch.cannot_serve(_args(head_dim, dtype))
        assert why is not None and f"head_dim {head_dim} > 128" in why, why
        assert f"compute capability {major}.{minor}" in why and f"{shared} bytes" in why, why
    assert launch.cannot_serve(_args(128)) is None
    assert launch.cannot_serve(_args(64)) is None


def test_gpus_below_compute_capability_8_are_refused(fake_gpu):
    fake_gpu("T4")
    why = launch.cannot_serve(_args(64))
    assert why is not None and "compute capability 7.5" in why and "8.0" in why, why


def test_a_gpu_with_less_shared_memory_than_its_tiles_use_is_refused(fake_gpu):
    """The sm_90 tiles (any compute capability from 9.0) may use up to 227 KB per block: a 9.0-or-later GPU that
    offers 99 KB is refused; the sm_80 tiles stay within 99 KB, so every 8.x GPU runs them."""
    fake_gpu("RTX 5090")
    why = launch.cannot_serve(_args(64))
    assert why is not None and "sm_90" in why and str(launch.TILE_SHARED_LIMIT[90]) in why, why
    fake_gpu("RTX 4090")
    assert launch.cannot_serve(_args(64)) is None


def test_device_properties_are_read_once_per_device(fake_gpu):
    reads = fake_gpu("H100")
    for _ in range(3):
        for index in (0, 1):
            assert launch.cannot_serve(_args(64, index=index)) is None
    assert sorted(reads) == [0, 1]


def test_cpu_calls_never_read_device_properties(monkeypatch):
    """Under the interpreter (CPU tensors) nothing asks CUDA for a device; D > 128 is refused there too, as on
    every GPU."""
    skip_unless_runs("triton", "cpu")

    def no_cuda(*args, **kwargs):
        raise AssertionError("read CUDA device properties for a CPU call")

    monkeypatch.setattr(torch.cuda, "get_device_properties", no_cuda)
    launch._device_limits.cache_clear()
    t, masks = make_inputs(1, 16, 1, 16, n_global={0: [3]})
    assert launch.cannot_serve(check_inputs(**t, **masks, window=2)) is None
    t, _ = make_inputs(1, 16, 1, 160)
    why = launch.cannot_serve(check_inputs(**t, window=2))
    assert why is not None and "head_dim 160 > 128" in why
