"""Loads the compiled extension ``pyprotoclip._C`` once, safely.

A compiled library only works with the torch it was built against; loading it into another one
fails with an undefined-symbol error (or worse). The build records its torch version in
``_build_info.json``; on a mismatch we do not load it and warn once, and every op falls back to
its pure-PyTorch reference.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from typing import Any

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))


def _recorded_build() -> dict[str, Any] | None:
    path = os.path.join(_HERE, "_build_info.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


@functools.lru_cache(maxsize=None)
def load() -> tuple[Any | None, str]:
    """(the ``_C`` module or None, why not)."""
    recorded = _recorded_build()
    if recorded is not None and recorded.get("torch_version") != torch.__version__:
        reason = (
            f"pyprotoclip._C was built for torch {recorded.get('torch_version')} but torch {torch.__version__} "
            "is installed; using the pure-PyTorch reference ops. Rebuild with "
            "`pip install --no-build-isolation -e .` (or reinstall pyprotoclip) to use the compiled ops."
        )
        warnings.warn(reason, RuntimeWarning, stacklevel=3)
        return None, reason
    try:
        import pyprotoclip._C as _C  # registers torch.ops.pyprotoclip.*
    except ImportError as exc:
        reason = f"pyprotoclip._C is not built ({exc}); using the pure-PyTorch reference ops"
        return None, reason
    return _C, ""


def library_path() -> str | None:
    """Path of the compiled shared library, for ``torch.ops.load_library`` in other projects."""
    module, _ = load()
    return getattr(module, "__file__", None)


_compiled_devices: frozenset[str] | None = None


def compiled_devices() -> frozenset[str]:
    """Device types the compiled kernels were built for (subset of {'cpu', 'cuda'}).

    Computed once and then read from a global, so torch.compile traces it as a constant.
    """
    global _compiled_devices
    if _compiled_devices is None:
        module, _ = load()
        if module is None:
            _compiled_devices = frozenset()
        else:
            _compiled_devices = frozenset({"cpu", "cuda"} if module.build_info()["cuda"] else {"cpu"})
    return _compiled_devices


def library_info() -> dict[str, Any]:
    """What was compiled (CPU/CUDA kernels, archs, versions, OpenMP), or why nothing is loaded."""
    module, reason = load()
    info: dict[str, Any] = {
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "torch_num_threads": torch.get_num_threads(),
        "compiled": module is not None,
    }
    if module is None:
        info["reason"] = reason
    else:
        built = dict(module.build_info())
        info.update({
            "library": module.__file__,
            "built_torch_version": built["torch_version"],
            "cpu_kernels": True,
            "cuda_kernels": bool(built["cuda"]),
            "cuda_archs": built["cuda_archs"] or None,
            "openmp": built["openmp"],
            "openmp_max_threads": built["openmp_max_threads"],
            "compiler": built["compiler"],
        })
    return info
