"""The checkpoint format, shared by training (writes, resumes) and evaluation (reads the towers).

Checkpoints are written atomically (temp file + ``os.replace``) and read with ``weights_only=True``.
A training checkpoint is a plain dict of tensors and primitives: ``format``, ``step``, ``epoch``
(completed epochs), ``steps_per_epoch``, ``model`` (architecture name), ``model_cfg``, ``method``,
``state_dict`` (the whole trained model, the method's additions included), ``method_keys`` (the
state-dict keys the method added: projection heads, extra scales), ``method_state`` (prototypes,
labels, ...), ``optimizer``, ``scaler``, ``scheduler``, ``rng`` (one entry per rank), ``world_size``,
``params``. A plain state dict (open_clip's) is accepted wherever model weights are read.
"""

from __future__ import annotations

import glob
import logging
import os
import random
import re
from typing import Any

import numpy as np
import torch

from pyprotoclip import distributed as pdist

log = logging.getLogger("pyprotoclip.checkpoint")

FORMAT = "pyprotoclip-train-v1"
LATEST = "epoch_latest.pt"


def save_checkpoint(obj: dict[str, Any], path: str) -> None:
    """Write ``obj`` to ``path`` so that a reader never sees a partial file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _looks_like(path: str) -> str:
    """What a file that torch cannot read appears to be, from its first bytes."""
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        return "an empty file"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (torch's format) that is damaged or truncated"
    if head[:1] == b"\x80":
        return "a pickle of an older torch format or of arbitrary Python objects"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "binary data of an unknown format"
    return f"a text file starting {text.splitlines()[0][:40]!r}" if text.strip() else "a text file"


def load_checkpoint(path: str, *, mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``: no arbitrary code runs, and a file that is not a
    checkpoint (text, empty, truncated, a pickle of other objects) is a one-line ValueError saying what it
    looks like instead."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint: no such file {path!r}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # noqa: BLE001 - torch raises many types (KeyError, UnpicklingError, ...) for non-checkpoints
        # torch's own messages run to several lines and suggest weights_only=False, which we never do
        text = str(exc)
        if isinstance(exc, EOFError):
            reason = "the file is empty or truncated"
        elif "WeightsUnpickler error:" in text:
            reason = (text.split("WeightsUnpickler error:", 1)[1].strip().splitlines() or ["not a pickle"])[0]
        else:
            reason = (text.strip().splitlines() or [type(exc).__name__])[0].split(". ")[0]
            reason = f"{type(exc).__name__}: {reason}" if isinstance(exc, (KeyError, ValueError, TypeError)) else reason
        raise ValueError(
            f"checkpoint: {path!r} is not a torch checkpoint readable with weights_only=True: it looks like "
            f"{_looks_like(path)} ({reason[:160]})"
        ) from None


META_KEYS = ("step", "epoch", "model", "name", "method")


def model_weights(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(architecture weights, meta) of a loaded checkpoint or plain state dict.

    The weights leave out the keys a method added (``method_keys``): evaluation uses the towers.
    meta holds step, epoch, model, name and method where the checkpoint records them.
    """
    if isinstance(state, dict) and "state_dict" in state:
        extra = set(state.get("method_keys") or ())
        weights = {k: v for k, v in state["state_dict"].items() if k not in extra}
        return weights, {k: state[k] for k in META_KEYS if k in state}
    return state, {}


def find_latest(checkpoint_dir: str) -> str | None:
    """The checkpoint in ``checkpoint_dir`` with the highest step (``epoch_latest.pt`` or ``epoch_<N>.pt``)."""
    candidates = [p for p in glob.glob(os.path.join(checkpoint_dir, "*.pt")) if re.search(r"epoch_(\d+|latest)\.pt$", p)]
    if not candidates:
        return None

    def step_of(path: str) -> tuple[int, int]:
        try:
            step = int(load_checkpoint(path, mmap=True).get("step", -1))
        except Exception:  # an unreadable file never wins
            step = -1
        return step, int(os.path.basename(path) == LATEST)

    return max(candidates, key=step_of)


def get_rng_state() -> dict[str, Any]:
    """This process's RNG states (torch, CUDA, numpy, python) in a weights_only-loadable form."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def training_state(net: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: Any, world: int) -> dict[str, Any]:
    """The entries every trainer's checkpoint shares: weights, optimizer, scaler and the RNG state of
    every rank. A collective under torch.distributed: every rank must call it (each contributes its RNG)."""
    return {
        "state_dict": net.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": pdist.gather_object(get_rng_state()),
        "world_size": world,
    }


def restore_training_state(state: dict[str, Any], net: torch.nn.Module, optimizer: torch.optim.Optimizer,
                           scaler: Any, *, rank: int, world: int) -> int:
    """Load what :func:`training_state` saved into a run of ``world`` processes; returns the checkpoint's step.

    The RNG state of ``rank`` is restored only when the checkpoint has one per process of this run."""
    net.load_state_dict(state["state_dict"])
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    rngs = state.get("rng") or []
    if len(rngs) == world:
        set_rng_state(rngs[rank])
    else:
        log.warning("resume: checkpoint has RNG states for %d processes, this run has %d; not restoring RNG", len(rngs), world)
    return int(state["step"])
