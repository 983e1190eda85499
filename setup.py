"""Builds fastadv's kernels with torch.utils.cpp_extension for the torch that is installed.

CPU kernels are always built. CUDA kernels are built when torch is a CUDA build and nvcc is found, with or
without a GPU (set ``FASTADV_FORCE_CUDA=1`` to insist, ``FASTADV_FORCE_CPU=1`` to skip them).
``TORCH_CUDA_ARCH_LIST`` is honoured; without it and without a visible GPU a default list is used.
``MAX_JOBS`` sets ninja's parallelism. Install with ``pip install --no-build-isolation .`` so that the
build sees the installed torch.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import sys
import sysconfig
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "7.5;8.0;8.6;8.9;9.0+PTX"  # nvcc 13 targets sm_75 and newer only


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _is_cuda_root(path: str | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h"))


def find_cuda_home() -> str | None:
    """The CUDA toolkit root: the folder with bin/nvcc and include/. The nvcc on PATH may be a wrapper
    script living elsewhere, so look through it instead of trusting its folder."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        try:
            text = Path(real).read_text(errors="ignore")[:4096]
            candidates += [m for m in re.findall(r"(/[^\s'\"]+)/bin/nvcc", text)]
        except OSError:
            pass
    candidates += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True), "/opt/cuda"]
    return next((c for c in candidates if _is_cuda_root(c)), None)


def pip_cuda_include_dirs() -> list[str]:
    """Headers the pip CUDA packages carry (e.g. cusparse.h under nvidia/cu13/include)."""
    site = sysconfig.get_paths()["purelib"]
    dirs = sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "include")))
    dirs += sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))
    return list(dict.fromkeys(d for d in dirs if os.path.isdir(d)))


cuda_home = find_cuda_home()
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home  # must precede the cpp_extension import, which reads it once

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

want_cuda = not _flag("FASTADV_FORCE_CPU") and torch.version.cuda is not None and (
    cuda_home is not None or _flag("FASTADV_FORCE_CUDA"))
if _flag("FASTADV_FORCE_CUDA") and not want_cuda:
    sys.exit("FASTADV_FORCE_CUDA=1 but torch is not a CUDA build or no CUDA toolkit (bin/nvcc) was found; "
             "set CUDA_HOME to the toolkit root")
if want_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
    os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS

cxx_flags = ["-O3", "-std=c++20", "-fvisibility=hidden", "-fopenmp-simd"]
sources = ["csrc/fastadv.cpp", "csrc/frontend.cpp", "csrc/cpu/pgd_step.cpp", "csrc/cpu/prompt_pad.cpp"]
include_dirs = [str(ROOT / "csrc" / "include")]
if want_cuda:
    sources += ["csrc/cuda/register.cpp", "csrc/cuda/pgd_step.cu", "csrc/cuda/prompt_pad.cu"]
    include_dirs += pip_cuda_include_dirs()
    ext = CUDAExtension(
        "fastadv._C", sources, include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags + ["-DFASTADV_WITH_CUDA"],
                            "nvcc": ["-O3", "-std=c++17", "-lineinfo"]})
else:
    ext = CppExtension("fastadv._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx_flags})


def write_build_info() -> None:
    info = {
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda if want_cuda else None,
        "cuda_archs": os.environ.get("TORCH_CUDA_ARCH_LIST", "native") if want_cuda else None,
        "cuda_home": cuda_home if want_cuda else None,
    }
    body = "".join(f"{k} = {v!r}\n" for k, v in info.items())
    (ROOT / "fastadv" / "_build_info.py").write_text(
        '"""Written by setup.py: what the compiled kernels were built for."""\n' + body)


write_build_info()

setup(
    packages=find_packages(include=["fastadv", "fastadv.*"]),
    package_data={"fastadv": ["_build_info.py"]},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
