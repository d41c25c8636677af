"""Build script: compiles `csrc/*.cu` into a torch-free shared library when `nvcc` is available.

The library exposes `extern "C"` launchers that take a pointer to one parameter struct (`pk_params` in
`csrc/params.h`: raw device pointers, sizes, scalars) and a CUDA stream; Python loads it with `ctypes` and
mirrors the struct (see `prefix_kernels/backends/cuda.py`). It needs no torch headers, so it works under pip's
build isolation and loads under any installed torch. Every `csrc/*.cu` is compiled on its own, in parallel (the
kernels one file per dtype and direction, `api.cu` and `token_table.cu` apart), then linked into one library.

Environment:
  PREFIX_KERNELS_BUILD_CUDA   unset: build if nvcc is found, else warn; "0": skip; "1": build or fail.
  PREFIX_KERNELS_CUDA_ARCHS   semicolon-separated compute capabilities, default "80;90".
  CUDA_HOME / CUDA_PATH       where nvcc lives (checked before PATH).
"""

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

ROOT = Path(__file__).resolve().parent
LIB_NAME = "libprefix_kernels_cuda.so"


def _find_nvcc() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def _gencode_flags() -> list[str]:
    archs = os.environ.get("PREFIX_KERNELS_CUDA_ARCHS", "80;90")
    flags = []
    for arch in filter(None, (a.strip().replace(".", "") for a in archs.replace(",", ";").split(";"))):
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    return flags


def build_cuda_library(out_dir: Path) -> Path | None:
    mode = os.environ.get("PREFIX_KERNELS_BUILD_CUDA", "")
    if mode == "0":
        print("prefix_kernels: PREFIX_KERNELS_BUILD_CUDA=0, skipping the CUDA library", file=sys.stderr)
        return None
    sources = sorted((ROOT / "csrc").glob("*.cu"))
    nvcc = _find_nvcc()
    if nvcc is None or not sources:
        why = "nvcc not found (set CUDA_HOME)" if nvcc is None else "no sources in csrc/"
        if mode == "1":
            raise RuntimeError(f"prefix_kernels: PREFIX_KERNELS_BUILD_CUDA=1 but {why}")
        print(f"WARNING: prefix_kernels: {why}; installing without the CUDA backend", file=sys.stderr)
        return None
    tmp = ROOT / "build" / "cuda_obj"
    tmp.mkdir(parents=True, exist_ok=True)
    common = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr", "-lineinfo",
              f"-I{ROOT / 'csrc'}", *_gencode_flags()]

    def compile_one(src: Path) -> Path:
        obj = tmp / (src.stem + ".o")
        cmd = [nvcc, *common, "-c", str(src), "-o", str(obj)]
        print("prefix_kernels: " + " ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, check=True)
        return obj

    try:
        with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
            objs = list(pool.map(compile_one, sources))
        out_dir.mkdir(parents=True, exist_ok=True)
        lib = out_dir / LIB_NAME
        subprocess.run([nvcc, "-shared", *_gencode_flags(), *map(str, objs), "-o", str(lib)], check=True)
    except (subprocess.CalledProcessError, OSError) as exc:
        if mode == "1":
            raise
        print(f"WARNING: prefix_kernels: CUDA build failed ({exc}); installing without it", file=sys.stderr)
        return None
    print(f"prefix_kernels: built {lib}", file=sys.stderr)
    return lib


class BuildPyWithCuda(build_py):
    def run(self):
        super().run()
        lib = build_cuda_library(Path(self.build_lib) / "prefix_kernels" / "_lib")
        if lib is not None:
            # Also beside the sources, so `python -m prefix_kernels` run from a checkout finds the library.
            in_tree = ROOT / "prefix_kernels" / "_lib"
            try:
                in_tree.mkdir(exist_ok=True)
                shutil.copy2(lib, in_tree / LIB_NAME)
            except OSError:
                pass


class PlatformDistribution(Distribution):
    """The wheel may carry a compiled library: tag it for this platform, not `py3-none-any`."""

    def has_ext_modules(self):
        return True


setup(cmdclass={"build_py": BuildPyWithCuda}, distclass=PlatformDistribution)
