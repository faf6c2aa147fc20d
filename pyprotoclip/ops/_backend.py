"""Backend choice for every op: ``auto`` | ``compiled`` | ``reference``.

``auto`` uses the compiled kernel when it was built for the tensor's device and falls back to
``reference.py`` otherwise (warning once). ``PYPROTOCLIP_BACKEND`` overrides ``auto``.

``auto`` does not choose by size. At small shapes (B = 32..256, d = 128, fp32, fwd+bwd, the small-shape rows of
``tools/bench_infonce.py`` / ``bench_proto_softmax.py``) the cost is per-call work, not the kernels' fixed cost:
eager calls of ``infonce_loss`` and ``proto_cross_entropy`` therefore run the kernels and the final mean as one
autograd node (the same bits as the registered op's autograd). Routing tiny shapes to the reference would gain
nothing (it is the slower of the two there) and would change the values ``auto`` gives.
"""

from __future__ import annotations

import os
import warnings

import torch

from pyprotoclip import _library

BACKENDS = ("auto", "compiled", "reference")
_warned: set[str] = set()


def build_info() -> dict:
    """What was compiled (``_library.library_info``) and what ``backend='auto'`` picks on each device."""
    info = _library.library_info()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    info["auto_backend"] = {dev: auto_backend(torch.device(dev)) for dev in devices}
    return info


def auto_backend(device: torch.device) -> str:
    """What ``backend='auto'`` resolves to on ``device``."""
    forced = os.environ.get("PYPROTOCLIP_BACKEND", "").strip()
    if forced:
        if forced not in ("compiled", "reference"):
            raise ValueError(f"PYPROTOCLIP_BACKEND: expected 'compiled' or 'reference', got {forced!r}")
        return forced
    return "compiled" if device.type in _library.compiled_devices() else "reference"


def resolve(backend: str, device: torch.device, op: str) -> str:
    """Resolve ``backend`` for a call of ``op`` on ``device`` to 'compiled' or 'reference'."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference"
    available = device.type in _library.compiled_devices()
    if backend == "compiled":
        if not available:
            _, reason = _library.load()
            raise RuntimeError(
                f"{op}: backend='compiled' but no compiled kernel for device {device.type!r}"
                + (f" ({reason})" if reason else "")
            )
        return "compiled"
    chosen = auto_backend(device)
    if chosen == "compiled" and not available:
        raise RuntimeError(f"{op}: PYPROTOCLIP_BACKEND=compiled but no compiled kernel for {device.type!r}")
    if chosen == "reference" and not os.environ.get("PYPROTOCLIP_BACKEND") and device.type not in _warned:
        _warned.add(device.type)
        _, reason = _library.load()
        warnings.warn(
            f"pyprotoclip: no compiled kernels for {device.type!r}; using the pure-PyTorch reference ops"
            + (f" ({reason})" if reason else ""),
            RuntimeWarning,
            stacklevel=3,
        )
    return chosen


def choose(backend: str, t: torch.Tensor, op: str, name: str) -> str:
    """``resolve`` for an op whose main input (argument ``name``) is ``t``.

    float64 asks for exactness, and the compiled kernels compute in float32: ``auto`` (also with
    ``PYPROTOCLIP_BACKEND=compiled``) gives a float64 input to the reference, and an explicit
    ``backend="compiled"`` raises a ``ValueError`` naming the argument and its dtype instead of
    silently computing and returning float32.
    """
    if backend in BACKENDS and t.dtype == torch.float64:
        if backend == "compiled":
            raise ValueError(
                f"{name}: backend='compiled' has no float64 kernel (the kernels compute in float32), got dtype "
                f"{t.dtype}; use backend='reference' or 'auto' for an exact float64 result, or pass float32"
            )
        return "reference"
    return resolve(backend, t.device, op)
