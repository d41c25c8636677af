"""The CUDA library without a GPU: it is built, loads with ctypes, exposes its entry points, exports a `pk_params`
layout that `cuda_attention.PkParams` mirrors field for field, rejects bad arguments with a message, and the
package reports the backend as built-but-no-device on a GPU-less machine.

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


def test_params_layout_matches_the_ctypes_mirror(lib):
    # A field added, removed, reordered or retyped on one side only must fail here, on the CPU, not as a kernel
    # reading the wrong pointer on a GPU.
    mirror = cuda_attention.PkParams
    count = lib.pk_params_field_count()
    assert lib.pk_params_size() == ctypes.sizeof(mirror)
    assert count == len(mirror._fields_)
    for i, (name, ctype) in enumerate(mirror._fields_):
        assert lib.pk_params_field_name(i).decode() == name, i
        assert lib.pk_params_field_offset(i) == getattr(mirror, name).offset, name
        assert lib.pk_params_field_size(i) == ctypes.sizeof(ctype), name
    assert lib.pk_params_field_name(count) is None and lib.pk_params_field_offset(count) == -1
    assert lib.pk_params_field_name(-1) is None and lib.pk_params_field_size(-1) == -1
    assert cuda_attention.layout_mismatch(lib) is None


def test_params_reject_unknown_field_names():
    with pytest.raises(AttributeError):
        cuda_attention.new_params(dprefix_k=1)
    params = cuda_attention.new_params()
    assert params.abi_version == cuda_attention.ABI_VERSION and params.struct_size == ctypes.sizeof(params)
    with pytest.raises(AttributeError):
        params.tok = 1


def test_loader_refuses_a_params_layout_mismatch(lib):
    fields = list(cuda_attention.PkParams._fields_)
    swapped = type("Swapped", (ctypes.Structure,), {"_fields_": [fields[1], fields[0], *fields[2:]]})
    assert "field 0" in cuda_attention.layout_mismatch(lib, swapped)
    shorter = type("Shorter", (ctypes.Structure,), {"_fields_": fields[:-1]})
    assert "bytes" in cuda_attention.layout_mismatch(lib, shorter)
    renamed = type("Renamed", (ctypes.Structure,), {"_fields_": [*fields[:-1], ("dpv_ws", ctypes.c_void_p)]})
    assert "dpv_ws" in cuda_attention.layout_mismatch(lib, renamed)


def _call(lib, fn, params):
    return getattr(lib, fn)(ctypes.byref(params), None)


def test_bad_arguments_fail_with_a_message_before_touching_the_device(lib):
    # argument checks run before any CUDA call, so this works without a GPU
    p = 1  # any non-null "device pointer": never dereferenced on this path
    params = cuda_attention.new_params(dtype=2, B=1, N=8, H=1, D=48, P=0, window=2, scale=0.125, dropout_p=0.0,
                                       max_global=0, global_chunk=1, num_splits=1, q=p, k=p, v=p, out=p, lse=p,
                                       tok_ws=p)
    assert _call(lib, "pk_forward", params) != 0
    assert b"head dim" in lib.pk_last_error()
    params.D = 64
    params.dropout_p = 1.0  # must be < 1
    assert _call(lib, "pk_forward", params) != 0 and b"dropout_p" in lib.pk_last_error()
    params.dropout_p = 0.0
    params.max_global = 3  # max_global > 0 without global projections / index
    for name in ("grad_out", "dq", "dk", "dv", "delta_ws"):
        setattr(params, name, p)
    assert _call(lib, "pk_backward", params) != 0 and b"max_global" in lib.pk_last_error()


def test_abi_header_is_checked_before_any_other_field(lib):
    params = cuda_attention.new_params(D=48)  # would fail the head-dim check, were it read
    for fn in ("pk_forward", "pk_backward"):
        params.abi_version = cuda_attention.ABI_VERSION - 1
        assert _call(lib, fn, params) != 0
        msg = lib.pk_last_error().decode()
        assert "abi_version" in msg and "head dim" not in msg
        params.abi_version = cuda_attention.ABI_VERSION
        params.struct_size = ctypes.sizeof(params) - 8
        assert _call(lib, fn, params) != 0 and "struct_size" in lib.pk_last_error().decode()
        params.struct_size = ctypes.sizeof(params)
        assert getattr(lib, fn)(None, None) != 0 and b"null params" in lib.pk_last_error()


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
