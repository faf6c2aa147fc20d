"""The checkpoint format, shared by training (writes, resumes) and evaluation (reads the towers).

Checkpoints are written atomically (temp file + ``os.replace``) and read with ``weights_only=True``.
A training checkpoint is a plain dict of tensors and primitives: ``format``, ``step``, ``epoch``
(completed epochs), ``steps_per_epoch``, ``model`` (architecture name), ``model_cfg``, ``method``,
``state_dict`` (the whole trained model, the method's additions included), ``method_keys`` (the
state-dict keys the method added: projection heads, extra scales), ``method_state`` (prototypes,
labels, ...), ``optimizer``, ``scaler``, ``scheduler``, ``rng`` (one entry per rank), ``world_size``,
``params``, ``results_bytes`` (the size of the run's results.jsonl then: a resumed run removes the rows
written after it). A plain state dict (open_clip's) is accepted wherever model weights are read.
"""

from __future__ import annotations

import glob
import logging
import os
import random
import re
import time
from typing import Any

import numpy as np
import torch

from pyprotoclip import distributed as pdist

log = logging.getLogger("pyprotoclip.checkpoint")

FORMAT = "pyprotoclip-train-v1"
LATEST = "epoch_latest.pt"
TEMP_PATTERN = re.compile(r"^\.(?P<target>.+)\.tmp(?P<pid>\d+)$")  # what save_checkpoint writes before the rename

# Test hook, off unless set: PYPROTOCLIP_TEST_SAVE_PAUSE=SECONDS[@N] sleeps SECONDS after the temp file of this
# process's N-th save (of every save without @N) is written and before it is renamed over the target;
# PYPROTOCLIP_TEST_SAVE_MARKER=PATH first writes the temp file's path to PATH, so a test knows when to kill.
TEST_SAVE_PAUSE, TEST_SAVE_MARKER = "PYPROTOCLIP_TEST_SAVE_PAUSE", "PYPROTOCLIP_TEST_SAVE_MARKER"
_saves_done = 0


def _test_pause(tmp: str) -> None:
    """The PYPROTOCLIP_TEST_SAVE_PAUSE hook (see above); does nothing when it is unset."""
    global _saves_done
    _saves_done += 1
    spec = os.environ.get(TEST_SAVE_PAUSE)
    if not spec:
        return
    seconds, _, nth = spec.partition("@")
    if nth and int(nth) != _saves_done:
        return
    marker = os.environ.get(TEST_SAVE_MARKER)
    if marker:
        with open(marker + ".part", "w") as f:
            f.write(tmp)
        os.replace(marker + ".part", marker)
    time.sleep(float(seconds))


def _os_error_in(exc: BaseException) -> OSError | None:
    """The OSError (a full disk, a quota) behind ``exc``, if its chain of causes holds one."""
    seen = exc
    while seen is not None and not isinstance(seen, OSError):
        seen = seen.__cause__ or seen.__context__
    return seen


def save_checkpoint(obj: dict[str, Any], path: str) -> None:
    """Write ``obj`` to ``path`` so that a reader never sees a partial file: a temp file beside it
    (``.<name>.tmp<pid>``, fsynced), renamed over ``path``. A process killed mid-write leaves the temp
    file and the previous ``path``; :func:`remove_stale_temp_files` cleans up after it. A failed write
    (a full disk) raises the ``OSError`` behind it."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            try:
                torch.save(obj, f)
            except RuntimeError as exc:  # torch's writer reports a failed write as its own error
                cause = _os_error_in(exc)
                if cause is None:
                    raise
                raise cause from None  # the OSError already says what failed
            f.flush()
            os.fsync(f.fileno())
        _test_pause(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # outside a save this process has no temp file: one with its pid is a dead namesake's
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp_files(checkpoint_dir: str, logger: logging.Logger | None = None) -> list[str]:
    """Remove the temp files that writers killed mid-save left in ``checkpoint_dir`` (those of a process
    that still runs on this machine stay); returns their paths, each also logged to ``logger`` if given.
    They never count as checkpoints (:func:`find_latest` reads ``epoch_<N>.pt`` and ``epoch_latest.pt``
    only) but hold a checkpoint's size. Every trainer calls it on rank 0 when a run starts."""
    removed = []
    if not os.path.isdir(checkpoint_dir):
        return removed
    for name in sorted(os.listdir(checkpoint_dir)):
        m = TEMP_PATTERN.match(name)
        if m and not _pid_alive(int(m["pid"])):
            path = os.path.join(checkpoint_dir, name)
            try:
                os.remove(path)
            except FileNotFoundError:
                continue
            removed.append(path)
            if logger is not None:
                logger.info("removed %s, left by a checkpoint write that did not finish", path)
    return removed


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


def choose_resume(resume: str | None, checkpoint_dir: str, is_main: bool) -> str | None:
    """The checkpoint a run continues from: for ``--resume latest`` the newest in ``checkpoint_dir``
    (:func:`find_latest`, None when there is none), chosen by rank 0 and broadcast, so every rank resumes
    from the same file even while rank 0 writes a newer one; for a path, that file (a ValueError when it
    does not exist); None without ``--resume``. Every rank calls it (a collective under torch.distributed)."""
    if resume == "latest":
        found = find_latest(checkpoint_dir) if is_main and os.path.isdir(checkpoint_dir) else None
        return pdist.broadcast_object(found)
    if resume:
        if not os.path.isfile(resume):
            raise ValueError(f"resume: no such checkpoint {resume!r} (or use --resume latest)")
        return resume
    return None


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
