"""The CUDA library without a GPU: it is built, loads with ctypes, exposes its entry points, rejects bad
arguments with a message, and the package reports the backend as built-but-no-device on a GPU-less machine.

The library comes from the installed package (`pip install .` builds it when nvcc is found). When it is
missing but nvcc is available, the test builds it for one architecture into a temporary directory (about a
minute on two cores) and points `PREFIX_KERNELS_CUDA_LIB` at it.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
from pathlib import Path

import pytest
import torch

import prefix_kernels as pk
from prefix_kernels import attention
from prefix_kernels.backends import cuda as cuda_attention
from prefix_kernels.core.checks import check_inputs

ROOT = Path(__file__).resolve().parents[2]


@functools.cache
def _setup_module():
    """`setup.py` as a module (its `setup()` call stubbed out), for its nvcc lookup and library build."""
    import setuptools

    spec = importlib.util.spec_from_file_location("_pk_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    saved_setup = setuptools.setup
    try:
        setuptools.setup = lambda **kwargs: None
        spec.loader.exec_module(module)
    finally:
        setuptools.setup = saved_setup
    return module


def _clear_caches():
    """Forget the loaded library and the dispatcher's cached reason, so that a new library path takes effect."""
    cuda_attention._load.cache_clear()
    attention._REASONS.pop("cuda", None)


@pytest.fixture(scope="module")
def lib_path(tmp_path_factory) -> Path:
    path = cuda_attention.library_path()
    if path.is_file():
        return path
    if not (ROOT / "setup.py").is_file() or not (ROOT / "csrc").is_dir():
        pytest.skip("CUDA library not built and no source checkout to build it from")
    setup = _setup_module()
    nvcc = setup._find_nvcc()
    if nvcc is None:
        pytest.skip(f"CUDA library not built ({path}) and nvcc not found: nothing to check")
    # build it from csrc with setup.py's own function, one architecture
    saved_env = dict(os.environ)
    try:
        os.environ["PREFIX_KERNELS_CUDA_ARCHS"] = "90"
        os.environ["PREFIX_KERNELS_BUILD_CUDA"] = "1"
        os.environ.setdefault("CUDA_HOME", str(Path(nvcc).parents[1]))
        built = setup.build_cuda_library(tmp_path_factory.mktemp("cudalib"))
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
    assert built is not None and built.is_file(), "nvcc is available but the CUDA library did not build"
    return built


@pytest.fixture
def lib(lib_path, monkeypatch):
    monkeypatch.setenv(cuda_attention.ENV_LIB, str(lib_path))
    _clear_caches()
    yield cuda_attention.library()
    monkeypatch.delenv(cuda_attention.ENV_LIB)
    _clear_caches()  # later tests see the default library path again


def test_library_exports_every_entry_point(lib, lib_path):
    raw = ctypes.CDLL(str(lib_path))
    for name in cuda_attention.ENTRY_POINTS:
        assert hasattr(raw, name), name
    assert lib.pk_abi_version() == cuda_attention.ABI_VERSION
    for d in cuda_attention.HEAD_DIMS:
        assert lib.pk_supports_head_dim(d) == 1
    for d in (8, 48, 80, 256):
        assert lib.pk_supports_head_dim(d) == 0
    assert lib.pk_forward_workspace_floats(2, 3, 64, 5, 7) == 2 * 3 * 5 * 7 * 66


def test_bad_arguments_fail_with_a_message_before_touching_the_device(lib):
    # argument checks run before any CUDA call, so this works without a GPU
    p = 1  # any non-null "device pointer": never dereferenced on this path
    args = [2, 1, 8, 1, 48, 0, 2, 0.125, 0.0, 0] + [p, p, p] + [None] * 8 + [0, 1, 1]
    rc = lib.pk_forward(*args, p, p, p, None, None)
    assert rc != 0
    assert b"head dim" in lib.pk_last_error()
    args[4] = 64
    args[8] = 1.0  # dropout_p must be < 1
    rc = lib.pk_forward(*args, p, p, p, None, None)
    assert rc != 0 and b"dropout_p" in lib.pk_last_error()
    args[8] = 0.0
    args[21] = 3  # max_global > 0 without global projections / index
    rc = lib.pk_backward(*args, *([p] * 16), None)
    assert rc != 0 and b"max_global" in lib.pk_last_error()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the GPU-less report")
def test_available_backends_reports_built_but_no_device(lib):
    why = pk.available_backends()["cuda"]
    assert why is not None and "built, but no CUDA device" in why


def test_not_built_reason_says_how_to_build(monkeypatch, tmp_path):
    monkeypatch.setenv(cuda_attention.ENV_LIB, str(tmp_path / "missing.so"))
    _clear_caches()
    try:
        why = cuda_attention.unavailable_reason()
        assert why is not None and "not built" in why and "pip install" in why
    finally:
        monkeypatch.delenv(cuda_attention.ENV_LIB)
        _clear_caches()


def _args(dtype=torch.float16, d=64, device="cpu"):
    q = torch.zeros(1, 8, 2, d, dtype=dtype, device=device)
    return check_inputs(q, q, q, window=2)


def test_cannot_serve_reasons():
    assert "float64" in cuda_attention.cannot_serve(_args(torch.float64))
    assert "head dim 48" in cuda_attention.cannot_serve(_args(d=48))
    assert "cpu" in cuda_attention.cannot_serve(_args())
    for d in cuda_attention.HEAD_DIMS:
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            assert "CUDA device" in cuda_attention.cannot_serve(_args(dtype, d))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the GPU-less refusal")
def test_explicit_cuda_backend_refuses_with_the_reason():
    q = torch.zeros(1, 8, 2, 64)
    with pytest.raises(ValueError, match="backend 'cuda' cannot serve"):
        pk.longformer_attention(q, q, q, window=2, backend="cuda")
