"""Builds ``pyprotoclip._C``: C++ CPU kernels always, CUDA kernels when nvcc and a CUDA torch exist.

``PYPROTOCLIP_CUDA=0|1`` forces the CUDA part off/on. Whether to build CUDA is decided from the
toolchain (nvcc + ``torch.version.cuda``), never from ``torch.cuda.is_available()``, which is false
on build machines without a GPU.
"""

from __future__ import annotations

import glob
import json
import os
import shutil

import torch
from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0"


def _cuda_toolchain() -> tuple[bool, str]:
    """(can build CUDA, reason)."""
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is not a CUDA build"
    if cpp_extension.CUDA_HOME is None or shutil.which("nvcc", path=os.path.join(cpp_extension.CUDA_HOME, "bin")) is None:
        return False, "nvcc not found (set CUDA_HOME)"
    return True, f"nvcc in {cpp_extension.CUDA_HOME}, torch CUDA {torch.version.cuda}"


def _want_cuda() -> bool:
    possible, reason = _cuda_toolchain()
    forced = os.environ.get("PYPROTOCLIP_CUDA")
    if forced == "0":
        print("pyprotoclip: CUDA kernels disabled by PYPROTOCLIP_CUDA=0")
        return False
    if forced == "1" and not possible:
        raise RuntimeError(f"PYPROTOCLIP_CUDA=1 but the CUDA kernels cannot be built: {reason}")
    print(f"pyprotoclip: CUDA kernels {'enabled' if possible else 'disabled'}: {reason}")
    return possible


def _pip_cuda_includes() -> list[str]:
    """Header folders of the nvidia-* wheels torch depends on (cuSPARSE, cuBLAS, ...).

    torch's CUDA headers include them, and a bare nvcc install (no full toolkit) may not have them.
    """
    try:
        import nvidia
    except ImportError:
        return []
    found = []
    for root in nvidia.__path__:
        found += sorted(glob.glob(os.path.join(root, "*", "include")))
        found += sorted(glob.glob(os.path.join(root, "include")))
    return [path for path in found if os.path.isdir(path)]


def _write_build_info(with_cuda: bool, archs: str) -> None:
    """Record what this build is, so the package can refuse to load a mismatched library cleanly."""
    info = {
        "torch_version": torch.__version__,
        "with_cuda": with_cuda,
        "cuda_version": torch.version.cuda if with_cuda else None,
        "cuda_archs": archs if with_cuda else None,
        # tools/setup.sh's digest of the sources this build came from: a re-run with nothing changed skips the build
        "sources": os.environ.get("PYPROTOCLIP_SOURCE_DIGEST"),
    }
    with open(os.path.join(ROOT, "pyprotoclip", "_build_info.json"), "w") as f:
        json.dump(info, f, indent=2)


def _extension():
    with_cuda = _want_cuda()
    archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    # csrc/<stem>.cpp: schemas and C++ entry points; csrc/module.cpp: build info; cpu/, cuda/: kernels
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    define = [("PYPROTOCLIP_PYTHON_MODULE", None), ("TORCH_VERSION_STRING", f'"{torch.__version__}"')]
    # no FMA contraction: the row epilogues rely on a*x - b rounding the same way in max and in exp.
    # No trapping math: without it GCC will not if-convert the float compares in the exp's clamp and the
    # max/min reductions, so those loops stay scalar (8x slower); no result changes, the ops are the same.
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math"]
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        define += [("WITH_CUDA", None), ("PYPROTOCLIP_CUDA_ARCHS", f'"{archs}"')]
    _write_build_info(with_cuda, archs)
    kind = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    return kind(
        name="pyprotoclip._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")] + (_pip_cuda_includes() if with_cuda else []),
        define_macros=define,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc} if with_cuda else {"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
