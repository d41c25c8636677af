"""The CUDA backend: `ctypes` bindings of the torch-free library built from `csrc/` by `pip install .`.

The library (`prefix_kernels/_lib/libprefix_kernels_cuda.so`, or the file named by `PREFIX_KERNELS_CUDA_LIB`)
exposes two `extern "C"` launchers, `pk_forward` / `pk_backward`, each taking a pointer to one `pk_params` struct
(raw device pointers, sizes, scalars; `PkParams` here mirrors it) and a CUDA stream; see `csrc/api.cu` for the C
contract, `csrc/params.h` for the struct and `csrc/launch.cuh` for the kernel design. This module

* loads it lazily, refuses a library of another ABI version or whose exported `pk_params` layout differs from
  `PkParams` (size, and every field's name, offset and size), and says why it cannot be used
  (`unavailable_reason`, `cannot_serve`: the backend-module interface of `backends/__init__.py`);
* wraps the two launchers as `forward` / `backward`, the contract the shared custom op in `core/custom_op.py`
  calls: it allocates outputs and fp32 workspaces with torch and runs on `torch.cuda.current_stream()`.

`lse` is `(B, H, N)` fp32 in the log2 domain of the scaled scores (`+inf` for padding rows and rows with no
key); only this backend's `backward` reads it.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import torch

from ..core.checks import AttentionArgs
from ..core.poison import poison_

ENV_LIB = "PREFIX_KERNELS_CUDA_LIB"
LIB_NAME = "libprefix_kernels_cuda.so"
ABI_VERSION = 2
HEAD_DIMS = (16, 32, 64, 128)
_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
# Columns (keys + prefix) per split of the global-row kernels; more splits when there are few global rows.
_GLOBAL_CHUNK_MIN = 256
_GLOBAL_TARGET_WARPS = 1 << 16

_P = ctypes.c_void_p
_I = ctypes.c_int
_I32 = ctypes.c_int32
_U32 = ctypes.c_uint32


class PkParams(ctypes.Structure):
    """Mirror of the library's `pk_params` (`csrc/params.h`), the one argument of `pk_forward` / `pk_backward`.

    The loader compares this layout (size, every field's name, offset and size) with the one the library exports
    and refuses a library that differs."""

    __slots__ = ()  # a misspelt field name raises AttributeError instead of setting an attribute no C code reads
    _fields_ = [
        ("abi_version", _U32), ("struct_size", _U32), ("dtype", _I32),
        ("B", _I32), ("N", _I32), ("H", _I32), ("D", _I32), ("P", _I32), ("window", _I32),
        ("scale", ctypes.c_float), ("dropout_p", ctypes.c_float),
        ("max_global", _I32), ("global_chunk", _I32), ("num_splits", _I32), ("seed", ctypes.c_uint64),
        # inputs
        ("q", _P), ("k", _P), ("v", _P), ("q_global", _P), ("k_global", _P), ("v_global", _P),
        ("prefix_k", _P), ("prefix_v", _P), ("key_padding_mask", _P), ("global_idx", _P), ("global_count", _P),
        # forward: outputs; backward: inputs
        ("out", _P), ("lse", _P),
        # backward only
        ("grad_out", _P), ("dq", _P), ("dk", _P), ("dv", _P), ("dq_global", _P), ("dk_global", _P),
        ("dv_global", _P),
        # workspaces: tok_ws both directions, gpart_ws forward, the rest backward
        ("tok_ws", _P), ("gpart_ws", _P), ("delta_ws", _P), ("dk_gslot_ws", _P), ("dv_gslot_ws", _P),
        ("dqg_gslot_ws", _P), ("dprefix_k_ws", _P), ("dprefix_v_ws", _P),
    ]


_SIGNATURES = {
    "pk_abi_version": ([], _I),
    "pk_last_error": ([], ctypes.c_char_p),
    "pk_supports_head_dim": ([_I], _I),
    "pk_params_size": ([], _I),
    "pk_params_field_count": ([], _I),
    "pk_params_field_name": ([_I], ctypes.c_char_p),
    "pk_params_field_offset": ([_I], _I),
    "pk_params_field_size": ([_I], _I),
    "pk_forward_workspace_floats": ([_I, _I, _I, _I, _I], ctypes.c_longlong),
    "pk_forward": ([ctypes.POINTER(PkParams), _P], _I),  # params, stream
    "pk_backward": ([ctypes.POINTER(PkParams), _P], _I),
}
ENTRY_POINTS = tuple(_SIGNATURES)


def new_params(**fields) -> PkParams:
    """A zeroed `PkParams` with the ABI header set (`abi_version`, `struct_size`) and `fields` assigned."""
    return PkParams(abi_version=ABI_VERSION, struct_size=ctypes.sizeof(PkParams), **fields)


def params_layout(lib: ctypes.CDLL) -> tuple[int, list[tuple[str, int, int]]]:
    """`(size, [(name, offset, size) per field])` of `pk_params` as the library exports it."""
    fields = [(lib.pk_params_field_name(i).decode(), lib.pk_params_field_offset(i), lib.pk_params_field_size(i))
              for i in range(lib.pk_params_field_count())]
    return lib.pk_params_size(), fields


def mirror_layout(struct: type[ctypes.Structure] = PkParams) -> tuple[int, list[tuple[str, int, int]]]:
    """The same for a `ctypes.Structure`."""
    return ctypes.sizeof(struct), [(name, getattr(struct, name).offset, getattr(struct, name).size)
                                   for name, _ in struct._fields_]


def layout_mismatch(lib: ctypes.CDLL, struct: type[ctypes.Structure] = PkParams) -> str | None:
    """Why `struct` does not mirror the library's `pk_params`, or None when size and every field agree."""
    lib_size, lib_fields = params_layout(lib)
    size, fields = mirror_layout(struct)
    if lib_size != size:
        return f"pk_params is {lib_size} bytes in the library, {size} in {struct.__name__}"
    for i in range(max(len(lib_fields), len(fields))):
        theirs = lib_fields[i] if i < len(lib_fields) else None
        ours = fields[i] if i < len(fields) else None
        if theirs != ours:
            return f"pk_params field {i} is (name, offset, size) {theirs} in the library, {ours} in {struct.__name__}"
    return None


def library_path() -> Path:
    """Where the library is looked for: `$PREFIX_KERNELS_CUDA_LIB`, else `prefix_kernels/_lib/`."""
    custom = os.environ.get(ENV_LIB)
    if custom:
        return Path(custom)
    return Path(__file__).resolve().parents[1] / "_lib" / LIB_NAME


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    path = library_path()
    if not path.is_file():
        return None, (
            f"CUDA library not built ({path} missing): install with nvcc available "
            "(CUDA_HOME=/usr/local/cuda PREFIX_KERNELS_BUILD_CUDA=1 pip install .)"
        )
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        return None, f"CUDA library {path} failed to load: {exc}"
    # the version first: every ABI version exports it, and it names the problem better than a missing symbol
    try:
        lib.pk_abi_version.argtypes, lib.pk_abi_version.restype = _SIGNATURES["pk_abi_version"]
        version = lib.pk_abi_version()
    except AttributeError:
        return None, f"CUDA library {path} lacks the entry point pk_abi_version (stale build? reinstall)"
    if version != ABI_VERSION:
        return None, f"CUDA library {path} has ABI version {version}, expected {ABI_VERSION} (reinstall)"
    for name, (argtypes, restype) in _SIGNATURES.items():
        try:
            fn = getattr(lib, name)
        except AttributeError:
            return None, f"CUDA library {path} lacks the entry point {name} (stale build? reinstall)"
        fn.argtypes = argtypes
        fn.restype = restype
    mismatch = layout_mismatch(lib)
    if mismatch is not None:
        return None, f"CUDA library {path}: {mismatch} (stale build? reinstall)"
    return lib, None


def library() -> ctypes.CDLL:
    """The loaded library; raises `RuntimeError` with the reason when it cannot be loaded."""
    lib, why = _load()
    if lib is None:
        raise RuntimeError(why)
    return lib


# ---------------------------------------------------------------------------------------------------------
# backend-module interface (see backends/__init__.py)


def unavailable_reason() -> str | None:
    _, why = _load()
    if why is not None:
        return why
    if not torch.cuda.is_available():
        return "built, but no CUDA device (torch.cuda.is_available() is False)"
    return None


def cannot_serve(args: AttentionArgs) -> str | None:
    # properties of the call first (testable without a GPU), then the device
    if args.features:
        return f"{', '.join(args.features)} not implemented in the CUDA library"
    if args.local_rows_only:
        # The library's launchers take the global index only together with the global projections (without them
        # the global tokens would be treated as band keys).
        return "local rows only (global tokens without global projections) is not implemented in the CUDA library"
    if args.dtype not in _DTYPE_CODES:
        return f"dtype {args.dtype} not supported (float16, bfloat16, float32)"
    d = args.shape[3]
    if d not in HEAD_DIMS:
        return f"head dim {d} not compiled (supported: {', '.join(map(str, HEAD_DIMS))})"
    if args.device.type != "cuda":
        return f"tensors are on {args.device}, the CUDA backend needs a CUDA device"
    major, _ = torch.cuda.get_device_capability(args.device)
    if major < 8:
        return f"compute capability {major}.x < 8.0 (the library targets sm_80 and sm_90)"
    b, n, h, _ = args.shape
    if n >= 2**31 - 1 or b * n * h * d >= 2**62:
        return f"sequence length {n} too large"
    return None



# ---------------------------------------------------------------------------------------------------------
# launchers


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _contig(t: torch.Tensor | None) -> torch.Tensor | None:
    """Contiguous, and 16-byte aligned: the tensor-core kernels copy rows with 16-byte loads."""
    if t is None:
        return None
    t = t.contiguous()
    return t.clone() if t.data_ptr() % 16 else t


def _check(rc: int, lib: ctypes.CDLL) -> None:
    if rc != 0:
        msg = lib.pk_last_error()
        raise RuntimeError(msg.decode(errors="replace") if msg else f"prefix_kernels CUDA error {rc}")


def _global_split(b: int, h: int, n: int, p: int, max_global: int) -> tuple[int, int]:
    """`(chunk, num_splits)` of the global-row kernels: enough warps in flight, bounded partials memory."""
    cols = n + p
    if max_global == 0:
        return 1, 1
    want = max(1, _GLOBAL_TARGET_WARPS // max(1, b * h * max_global))
    chunk = max(_GLOBAL_CHUNK_MIN, -(-cols // want))
    return chunk, -(-cols // chunk)


def _make_params(q, k, v, q_global, k_global, v_global, prefix_k, prefix_v, key_padding_mask, global_idx,
                 global_count, window, scale, dropout_p, seed, max_global):
    """Normalized tensors (contiguous, kept alive by the caller) and the `PkParams` of a call with the fields both
    directions share filled in; each launcher then sets its outputs and workspaces."""
    b, n, h, d = q.shape
    if q.dtype not in _DTYPE_CODES:
        raise RuntimeError(f"prefix_kernels CUDA: dtype {q.dtype} not supported")
    has_global = q_global is not None and global_idx is not None and global_count is not None and max_global > 0
    if not has_global:
        max_global = 0
    p = 0 if prefix_k is None else prefix_k.shape[1]
    t = {
        "q": _contig(q), "k": _contig(k), "v": _contig(v),
        "q_global": _contig(q_global) if has_global else None,
        "k_global": _contig(k_global) if has_global else None,
        "v_global": _contig(v_global) if has_global else None,
        # an expanded (batch-stride 0) prefix becomes a real copy; autograd sums its gradient back
        "prefix_k": _contig(prefix_k) if p else None,
        "prefix_v": _contig(prefix_v) if p else None,
        "key_padding_mask": _contig(key_padding_mask.to(torch.bool)) if key_padding_mask is not None else None,
        "global_idx": _contig(global_idx.to(torch.int32)) if has_global else None,
        "global_count": _contig(global_count.to(torch.int32)) if has_global else None,
    }
    for name in ("k", "v", "q_global", "k_global", "v_global", "prefix_k", "prefix_v"):
        if t[name] is not None and t[name].dtype != q.dtype:
            raise RuntimeError(f"prefix_kernels CUDA: {name} has dtype {t[name].dtype}, expected {q.dtype}")
    if has_global and tuple(t["global_idx"].shape) != (b, max_global):
        raise RuntimeError(f"prefix_kernels CUDA: global_idx must be (B, max_global) = {(b, max_global)}")
    chunk, splits = _global_split(b, h, n, p, max_global)
    params = new_params(dtype=_DTYPE_CODES[q.dtype], B=b, N=n, H=h, D=d, P=p, window=min(int(window), n),
                        scale=float(scale), dropout_p=float(dropout_p), max_global=max_global, global_chunk=chunk,
                        num_splits=splits, seed=int(seed) & 0xFFFFFFFFFFFFFFFF)
    _set_pointers(params, **t)
    return t, params, (b, n, h, d, p, max_global, splits)


def _set_pointers(params: PkParams, **tensors: torch.Tensor | None) -> None:
    for name, tensor in tensors.items():
        setattr(params, name, _ptr(tensor))


def forward(q, k, v, q_global, k_global, v_global, prefix_k, prefix_v, key_padding_mask, global_idx, global_count,
            *, window: int, scale: float, dropout_p: float, seed: int, max_global: int):
    """`(out (B, N, H, D) q.dtype, lse (B, H, N) fp32)`; see the module docstring."""
    lib = library()
    b, n, h, d = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(b, h, n, device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        lse.fill_(float("inf"))
        return out, lse
    with torch.cuda.device(q.device):
        t, params, (_, _, _, _, _, max_global, splits) = _make_params(
            q, k, v, q_global, k_global, v_global, prefix_k, prefix_v, key_padding_mask, global_idx, global_count,
            window, scale, dropout_p, seed, max_global)
        tok = torch.empty(b, n, device=q.device, dtype=torch.int32)
        gpart = None
        if max_global > 0:
            floats = lib.pk_forward_workspace_floats(b, h, d, max_global, splits)
            gpart = torch.empty(floats, device=q.device, dtype=torch.float32)
        poison_(out, lse)
        _set_pointers(params, out=out, lse=lse, tok_ws=tok, gpart_ws=gpart)
        stream = torch.cuda.current_stream(q.device).cuda_stream
        _check(lib.pk_forward(ctypes.byref(params), stream), lib)
    return out, lse


def backward(grad_out, q, k, v, q_global, k_global, v_global, prefix_k, prefix_v, key_padding_mask, global_idx,
             global_count, out, lse, *, window, scale, dropout_p, seed, max_global):
    """`(dq, dk, dv, dq_global, dk_global, dv_global, dprefix_k, dprefix_v)`, `None` where the input is `None`."""
    lib = library()
    b, n, h, d = q.shape
    dev = q.device
    dq = torch.empty(b, n, h, d, device=dev, dtype=q.dtype)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    g_in = q_global is not None
    p_in = prefix_k is not None

    def zeros_like_input(t):
        return None if t is None else torch.zeros(t.shape, device=dev, dtype=t.dtype)

    if dq.numel() == 0:
        for t in (dq, dk, dv):
            t.zero_()
        return (dq, dk, dv, zeros_like_input(q_global), zeros_like_input(k_global), zeros_like_input(v_global),
                zeros_like_input(prefix_k), zeros_like_input(prefix_v))
    with torch.cuda.device(dev):
        t, params, (_, _, _, _, p, max_global, _) = _make_params(
            q, k, v, q_global, k_global, v_global, prefix_k, prefix_v, key_padding_mask, global_idx, global_count,
            window, scale, dropout_p, seed, max_global)
        f32 = {"device": dev, "dtype": torch.float32}
        if max_global > 0:
            dqg, dkg, dvg = (torch.empty(b, n, h, d, device=dev, dtype=q.dtype) for _ in range(3))
            ws_g = [torch.zeros(b, max_global, h, d, **f32) for _ in range(3)]
        else:
            # global projections given but no global row: their gradients are 0 and no kernel touches them
            dqg, dkg, dvg = zeros_like_input(q_global), zeros_like_input(k_global), zeros_like_input(v_global)
            ws_g = [None, None, None]
        ws_dpk = torch.zeros(b, p, h, d, **f32) if p else None
        ws_dpv = torch.zeros(b, p, h, d, **f32) if p else None
        tok = torch.empty(b, n, device=dev, dtype=torch.int32)
        delta = torch.empty(b, h, n, **f32)
        g_out = _contig(grad_out)
        o = _contig(out)
        lse_c = lse.contiguous()
        poison_(dq, dk, dv, dqg if max_global > 0 else None, dkg if max_global > 0 else None,
                dvg if max_global > 0 else None)
        launch_dqg, launch_dkg, launch_dvg = (dqg, dkg, dvg) if max_global > 0 else (None, None, None)
        _set_pointers(params, out=o, lse=lse_c, grad_out=g_out, dq=dq, dk=dk, dv=dv, dq_global=launch_dqg,
                      dk_global=launch_dkg, dv_global=launch_dvg, tok_ws=tok, delta_ws=delta, dk_gslot_ws=ws_g[0],
                      dv_gslot_ws=ws_g[1], dqg_gslot_ws=ws_g[2], dprefix_k_ws=ws_dpk, dprefix_v_ws=ws_dpv)
        stream = torch.cuda.current_stream(dev).cuda_stream
        _check(lib.pk_backward(ctypes.byref(params), stream), lib)
    dpk = ws_dpk.to(prefix_k.dtype) if p_in and p else zeros_like_input(prefix_k)
    dpv = ws_dpv.to(prefix_v.dtype) if p_in and p else zeros_like_input(prefix_v)
    if not g_in:
        dqg = dkg = dvg = None
    return dq, dk, dv, dqg, dkg, dvg, dpk, dpv
