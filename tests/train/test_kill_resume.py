"""Kill and resume: ``pyprotoclip train`` killed with SIGKILL at a random step, or while it writes a checkpoint,
then run again with ``--resume latest``, ends with bitwise the weights of an uninterrupted run; under
``torchrun --max-restarts 1`` a killed rank is restarted and the job resumes by itself.

The kill points are drawn from a seed printed in every assertion message; rerun one with
``PYPROTOCLIP_KILL_SEED=<seed>``. Every process a test starts carries a marker in its environment and is
killed (SIGKILL) when the test ends, whatever happened, so no worker outlives its test.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import uuid

import pytest
import torch

from pyprotoclip import checkpoint as ckpt

SEED = int(os.environ.get("PYPROTOCLIP_KILL_SEED") or random.SystemRandom().randrange(1_000_000))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUN_TIMEOUT = 240  # seconds for one run, start-up included, on a busy machine
MARK = "PYPROTOCLIP_KILL_TEST"  # environment variable naming the test that started a process
STEPS_PER_EPOCH, EPOCHS = 4, 2  # 64 samples, global batch 16
FLAGS = ["--model", "tiny-vit", "--epochs", str(EPOCHS), "--workers", "0", "--warmup", "1", "--precision", "fp32",
         "--log-every-n-steps", "1", "--device", "cpu", "--save-every-n-steps", "1", "--seed", "0", "--lr", "1e-3"]
PROTOCLIP = ["--method", "protoclip", "--episode-size", "64", "--num-prototypes", "8", "--kmeans-max-iter", "3",
             "--clustering-frequency", "2", "--add-projection-head", "--projection-dim", "16",
             "--projection-hidden-dim", "32", "--PBT"]


def _rng(name: str) -> random.Random:
    return random.Random(f"{SEED}-{name}")


def _why(msg: str) -> str:
    return f"[PYPROTOCLIP_KILL_SEED={SEED}] {msg}"


# ----------------------------------------------------------------------------------------------- processes


def _procs_marked(tag: str) -> list[int]:
    """Pids of live processes whose environment carries ``MARK=tag``."""
    needle = f"{MARK}={tag}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if needle in env:
            pids.append(int(entry))
    return pids


def _environ(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            items = f.read().split(b"\0")
    except OSError:
        return {}
    return dict(i.decode(errors="replace").split("=", 1) for i in items if b"=" in i)


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Job:
    """One ``pyprotoclip train`` (or torchrun) command: its output in a file, its processes marked."""

    def __init__(self, cmd: list[str], log_path: str, *, env: dict[str, str] | None = None) -> None:
        self.tag = uuid.uuid4().hex
        self.cmd, self.log_path = cmd, log_path
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, MARK: self.tag, **(env or {})}
        for key in (ckpt.TEST_SAVE_PAUSE, ckpt.TEST_SAVE_MARKER):
            if not (env and key in env):
                full_env.pop(key, None)
        with open(log_path, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=REPO,
                                         start_new_session=True)
        self.started = time.time()

    def output(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def describe(self, msg: str) -> str:
        tail = self.output()[-6000:]
        return _why(f"{msg}\n$ {' '.join(self.cmd)}\n--- output (last 6000 chars) ---\n{tail}")

    def wait_for(self, predicate, what: str, timeout: float = RUN_TIMEOUT) -> None:
        """Poll (every 10 ms) until ``predicate(output)`` holds; fails if the job ends first or time runs out."""
        deadline = time.time() + timeout
        while not predicate(self.output()):
            if self.proc.poll() is not None:
                raise AssertionError(self.describe(f"ended (rc {self.proc.returncode}) before {what}"))
            if time.time() > deadline:
                raise AssertionError(self.describe(f"no {what} after {timeout}s"))
            time.sleep(0.01)

    def kill_all(self) -> None:
        """SIGKILL every process of the job at once (torchrun and its workers, which have sessions of their own)."""
        _kill(_procs_marked(self.tag))
        self.proc.wait(timeout=30)
        deadline = time.time() + 30
        while _procs_marked(self.tag) and time.time() < deadline:
            time.sleep(0.05)

    def finish(self, timeout: float = RUN_TIMEOUT) -> str:
        """Wait for a clean exit (rc 0); returns the output."""
        try:
            rc = self.proc.wait(timeout=max(1.0, timeout - (time.time() - self.started)))
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise AssertionError(self.describe(f"still running after {timeout}s")) from None
        assert rc == 0, self.describe(f"exit status {rc}")
        return self.output()


@pytest.fixture
def jobs():
    """Start jobs with ``jobs(cmd, log, env=...)``; every process they started is killed at the end."""
    started: list[Job] = []

    def start(cmd: list[str], log_path: str, **kw) -> Job:
        started.append(Job(cmd, log_path, **kw))
        return started[-1]

    yield start
    for job in started:
        pids = _procs_marked(job.tag)
        _kill(pids)
        if job.proc.poll() is None:
            job.proc.kill()
        job.proc.wait(timeout=30)


# ----------------------------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from pyprotoclip.data import write_synthetic_dataset

    out = tmp_path_factory.mktemp("kill-data")
    info = write_synthetic_dataset(str(out), 64, num_val=0, num_ood=0, samples_per_shard=32, progress=False, processes=1)
    return info["train_shards"]


def _command(shards: str, logs: str, name: str, nproc: int, *extra: str, restarts: int = 0) -> list[str]:
    """``pyprotoclip train`` with the shared flags; under torchrun (gloo) when ``nproc`` > 1."""
    train = ["train", "--train-data", shards, "--batch-size", str(16 // nproc), "--logs-dir", logs, "--name", name,
             *FLAGS, *extra]
    if nproc == 1:
        return [sys.executable, "-m", "pyprotoclip", *train]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "--max-restarts", str(restarts), "-m", "pyprotoclip", *train]


@pytest.fixture(scope="module")
def uninterrupted(shards, tmp_path_factory):
    """uninterrupted(nproc, *extra) -> the final checkpoint of a run that was never killed (run once per flags)."""
    _baselines: dict[tuple, dict] = {}

    def get(nproc: int, *extra: str) -> dict:
        key = (nproc, *extra)
        if key not in _baselines:
            logs = str(tmp_path_factory.mktemp("uninterrupted"))
            job = Job(_command(shards, logs, "full", nproc, *extra), os.path.join(logs, "full.txt"))
            try:
                job.finish()
            finally:
                _kill(_procs_marked(job.tag))
            _baselines[key] = ckpt.load_checkpoint(os.path.join(logs, "full", "checkpoints", f"epoch_{EPOCHS}.pt"))
        return _baselines[key]

    return get


def _checkpoints(ckpt_dir: str) -> tuple[dict[str, int], list[str]]:
    """({checkpoint file: its step}, temp files); fails when a checkpoint does not load."""
    steps, temps = {}, []
    for name in sorted(os.listdir(ckpt_dir)) if os.path.isdir(ckpt_dir) else []:
        path = os.path.join(ckpt_dir, name)
        if ckpt.TEMP_PATTERN.match(name):
            temps.append(path)
        elif name.endswith(".pt"):
            try:
                steps[name] = int(ckpt.load_checkpoint(path)["step"])
            except Exception as exc:  # noqa: BLE001 - any failure to load is what the test looks for
                raise AssertionError(_why(f"{path} is corrupt after the kill: {exc}")) from None
    return steps, temps


def _assert_same_weights(got: dict, want: dict, what: str) -> None:
    assert got["step"] == want["step"], _why(f"{what}: step {got['step']}, uninterrupted {want['step']}")
    assert got["state_dict"].keys() == want["state_dict"].keys(), _why(what)
    diff = [k for k, v in want["state_dict"].items() if not torch.equal(v, got["state_dict"][k])]
    assert not diff, _why(f"{what}: {len(diff)} of {len(want['state_dict'])} tensors differ from the uninterrupted "
                          f"run's, e.g. {diff[:3]}")
    for k, v in (want.get("method_state") or {}).items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, got["method_state"][k]), _why(f"{what}: method state {k!r} differs")


def _step_shown(step: int):
    return lambda out: re.search(rf"\] step {step} \|", out) is not None


def _latest(ckpt_dir: str) -> tuple[str, int] | None:
    """What ``--resume latest`` should continue from: (path, step), or None for a fresh start."""
    path = ckpt.find_latest(ckpt_dir) if os.path.isdir(ckpt_dir) else None
    return None if path is None else (path, int(ckpt.load_checkpoint(path)["step"]))


def _check_resumed(job: Job, out: str, expected: tuple[str, int] | None, what: str) -> None:
    """The run of ``out`` resumed from ``expected`` (the last complete checkpoint) or started fresh."""
    resumed = re.findall(r"resumed from (\S+) at step (\d+)", out)
    if expected is None:
        assert not resumed and "--resume latest: no checkpoint in" in out, job.describe(f"{what}: expected a fresh start")
    else:
        assert resumed == [(expected[0], str(expected[1]))], job.describe(
            f"{what}: expected 'resumed from {expected[0]} at step {expected[1]}', the last complete checkpoint")


def _kill_during_a_write(jobs, cmd: list[str], logs: str, ckpt_dir: str,
                         nth: int) -> tuple[str, tuple[str, int] | None, str]:
    """Start ``cmd``; SIGKILL it while rank 0 sleeps between writing the temp file of its ``nth`` checkpoint
    write and renaming it (save_checkpoint's test hook). Checks what is left; returns (what, resume point,
    the temp file)."""
    marker = os.path.join(logs, "writing")
    job = jobs(cmd, os.path.join(logs, "killed-writing.txt"),
               env={ckpt.TEST_SAVE_PAUSE: f"120@{nth}", ckpt.TEST_SAVE_MARKER: marker})
    job.wait_for(lambda out: os.path.exists(marker), f"checkpoint write {nth}")
    job.kill_all()
    tmp = open(marker).read()
    steps, temps = _checkpoints(ckpt_dir)
    what = f"killed during checkpoint write {nth} ({os.path.basename(tmp)}; checkpoints then {steps})"
    assert temps == [tmp], job.describe(f"{what}: expected exactly the interrupted temp file, found {temps}")
    writing = int(ckpt.load_checkpoint(tmp)["step"])  # the temp file is whole: only the rename was missed
    target = ckpt.TEMP_PATTERN.match(os.path.basename(tmp))["target"]
    assert steps.get(target, -1) < writing, job.describe(f"{what}: {target} already holds step {writing}")
    expected = _latest(ckpt_dir)
    if expected is None:  # the first write was interrupted: nothing to resume from
        assert writing == 1, job.describe(f"{what}: no complete checkpoint before step {writing}")
    else:
        assert expected[1] in (writing - 1, writing), job.describe(f"{what}: would resume from {expected}")
    return what, expected, tmp


def _kill_at_a_step(job: Job, ckpt_dir: str, step: int) -> tuple[str, tuple[str, int] | None]:
    """SIGKILL ``job`` once its log shows ``step``; checks that every checkpoint loads; returns (what, resume point)."""
    job.wait_for(_step_shown(step), f"step {step}")
    job.kill_all()
    steps, temps = _checkpoints(ckpt_dir)
    expected = _latest(ckpt_dir)
    what = f"killed after the log showed step {step} (checkpoints then {steps}, temp files {len(temps)})"
    # the log shows step s once step s-1's checkpoint is written
    assert step == 1 or (expected is not None and expected[1] >= step - 1), job.describe(f"{what}: resume {expected}")
    return what, expected


def _check_the_end(job: Job, ckpt_dir: str, want: dict, what: str) -> None:
    """After the last run: no temp file, the uninterrupted run's weights, results.jsonl as if never killed."""
    _, temps = _checkpoints(ckpt_dir)
    assert not temps, job.describe(f"{what}: temp files left after the resumed run: {temps}")
    _assert_same_weights(ckpt.load_checkpoint(os.path.join(ckpt_dir, f"epoch_{EPOCHS}.pt")), want, what)
    results = os.path.join(os.path.dirname(ckpt_dir), "results.jsonl")
    rows = []
    for i, line in enumerate(open(results), 1):
        try:
            rows.append(json.loads(line))
        except ValueError:
            raise AssertionError(job.describe(f"{what}: results.jsonl line {i} is not JSON: {line[:200]!r}")) from None
    steps = [r["step"] for r in rows if r["type"] == "train"]
    assert steps == list(range(1, STEPS_PER_EPOCH * EPOCHS + 1)), job.describe(f"{what}: train rows of steps {steps}")
    kinds = [r["type"] for r in rows if r["type"] != "train"]
    assert kinds.count("summary") == 1 and kinds.count("episode") == int(want["method"] == "protoclip"), job.describe(
        f"{what}: rows besides train: {kinds}")


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_killed_during_a_checkpoint_write_then_at_a_random_step_resumes_exactly(jobs, shards, tmp_path, uninterrupted,
                                                                               nproc):
    """SIGKILL (of torchrun and both workers for 2 processes) during a random checkpoint write: the target keeps
    its previous content, and the run resumed with --resume latest removes the temp file; that run is
    killed again at a random step, and the third run ends with the uninterrupted run's weights."""
    rng = _rng(f"write-{nproc}")
    logs, name = str(tmp_path), "cut"
    ckpt_dir = os.path.join(logs, name, "checkpoints")
    want = uninterrupted(nproc)
    cmd = _command(shards, logs, name, nproc)
    nth = rng.randint(1, STEPS_PER_EPOCH + 1)  # writes 1..4: steps 1..4 (epoch_1.pt at 4), 5: epoch_latest.pt of step 4
    what, expected, tmp = _kill_during_a_write(jobs, cmd, logs, ckpt_dir, nth)

    resume = [*cmd, "--resume", "latest"]
    job = jobs(resume, os.path.join(logs, "resumed-1.txt"))
    start = 0 if expected is None else expected[1]
    step = rng.randint(start + 1, STEPS_PER_EPOCH * EPOCHS - 1)
    again, expected_again = _kill_at_a_step(job, ckpt_dir, step)
    out = job.output()
    _check_resumed(job, out, expected, what)
    assert f"removed {tmp}, left by a checkpoint write that did not finish" in out, job.describe(
        f"{what}: the resumed run did not remove the temp file")

    job = jobs(resume, os.path.join(logs, "resumed-2.txt"))
    out = job.finish()
    _check_resumed(job, out, expected_again, f"{what}, then {again}")
    _check_the_end(job, ckpt_dir, want, f"{what}, then {again}")


@pytest.mark.slow
def test_protoclip_killed_inside_an_episode_resumes_exactly(jobs, shards, tmp_path, uninterrupted):
    """ProtoCLIP with one episode of two epochs, killed at a random step inside it: the resumed run keeps the
    episode's prototypes (no re-clustering) and ends with the uninterrupted run's weights and method state."""
    logs, name = str(tmp_path), "cut"
    ckpt_dir = os.path.join(logs, name, "checkpoints")
    want = uninterrupted(1, *PROTOCLIP)
    cmd = _command(shards, logs, name, 1, *PROTOCLIP)
    step = _rng("protoclip").randint(1, STEPS_PER_EPOCH * EPOCHS - 2)
    what, expected = _kill_at_a_step(jobs(cmd, os.path.join(logs, "killed.txt")), ckpt_dir, step)
    job = jobs([*cmd, "--resume", "latest"], os.path.join(logs, "resumed.txt"))
    out = job.finish()
    _check_resumed(job, out, expected, what)
    if expected is not None:
        assert "extracting the features" not in out, job.describe(f"{what}: the resumed run clustered again")
    _check_the_end(job, ckpt_dir, want, what)


@pytest.mark.slow
def test_torchrun_restarts_a_killed_rank_and_the_job_resumes_exactly(jobs, shards, tmp_path, uninterrupted):
    """torchrun --max-restarts 1 with --resume latest: SIGKILL of the rank-1 worker at a random step; the
    restarted workers continue from the last checkpoint rank 0 wrote before the restart and finish."""
    total = STEPS_PER_EPOCH * EPOCHS
    step = _rng("elastic").randint(2, total - 2)  # step s shows once step s-1 is saved: there is a checkpoint
    logs, name = str(tmp_path), "elastic"
    want = uninterrupted(2)
    cmd = [*_command(shards, logs, name, 2, restarts=1), "--resume", "latest"]
    job = jobs(cmd, os.path.join(logs, "job.txt"))
    job.wait_for(_step_shown(step), f"step {step}")
    workers = {pid: _environ(pid) for pid in _procs_marked(job.tag)}
    rank1 = [pid for pid, env in workers.items() if env.get("RANK") == "1" and env.get("TORCHELASTIC_RESTART_COUNT") == "0"]
    assert len(rank1) == 1, job.describe(f"expected one rank-1 worker, found {rank1} among {sorted(workers)}")
    _kill(rank1)
    out = job.finish()
    what = f"rank 1 killed after the log showed step {step}"
    log = open(os.path.join(logs, name, "out.log")).read()
    first, _, second = log.partition("resumed from ")
    assert second, job.describe(f"{what}: the restarted job did not resume\n--- out.log ---\n{log[-4000:]}")
    # the last checkpoint written before the restart: the step of the last "saved" line before it
    saved_at, current = None, None
    for line in first.splitlines():
        m = re.search(r"\] step (\d+) \|", line)
        current = int(m[1]) if m else current
        if " | saved " in line:
            saved_at = current
    m = re.match(r"(\S+) at step (\d+)", second)
    assert saved_at is not None and int(m[2]) == saved_at and saved_at >= step - 1, job.describe(
        f"{what}: resumed at step {m[2]}, the last checkpoint before the restart was at step {saved_at}")
    assert "--resume latest: no checkpoint" in first, job.describe(f"{what}: the first attempt did not start fresh")
    _check_the_end(job, os.path.join(logs, name, "checkpoints"), want, what)
    assert out.count("on 2 process(es)") == 2, job.describe(f"{what}: expected two starts of the two workers")


def test_stale_temp_files_are_removed_and_a_live_writers_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for name in ("epoch_latest.pt", f".epoch_latest.pt.tmp{dead.pid}", f".epoch_3.pt.tmp{os.getppid()}", "notes.tmp1"):
        (tmp_path / name).write_bytes(b"x")
    assert ckpt.remove_stale_temp_files(str(tmp_path)) == [str(tmp_path / f".epoch_latest.pt.tmp{dead.pid}")]
    assert sorted(os.listdir(tmp_path)) == sorted([".epoch_3.pt.tmp%d" % os.getppid(), "epoch_latest.pt", "notes.tmp1"])
    assert ckpt.remove_stale_temp_files(str(tmp_path / "missing")) == []


def test_the_save_pause_hook_pauses_only_the_nth_write_before_the_rename(tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    monkeypatch.setattr(ckpt, "_saves_done", 0)
    monkeypatch.setenv(ckpt.TEST_SAVE_PAUSE, "0.3@2")
    monkeypatch.setenv(ckpt.TEST_SAVE_MARKER, str(marker))
    target = str(tmp_path / "epoch_latest.pt")
    seen = []
    real_replace = os.replace

    def replace(src, dst):
        seen.append((os.path.exists(marker), os.path.exists(src)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    times = []
    for step in (1, 2, 3):
        t0 = time.perf_counter()
        ckpt.save_checkpoint({"step": step}, target)
        times.append(time.perf_counter() - t0)
    assert times[1] >= 0.3 and times[0] < 0.3 and times[2] < 0.3, times
    assert open(marker).read() == str(tmp_path / f".epoch_latest.pt.tmp{os.getpid()}")
    # the marker is written (its own rename) before the checkpoint's rename, while the temp file exists
    assert (True, True) in seen and ckpt.load_checkpoint(target)["step"] == 3
    assert not [f for f in os.listdir(tmp_path) if ckpt.TEMP_PATTERN.match(f)]
    monkeypatch.delenv(ckpt.TEST_SAVE_PAUSE)
    t0 = time.perf_counter()
    ckpt.save_checkpoint({"step": 4}, target)
    assert time.perf_counter() - t0 < 0.3


def test_each_torchrun_restart_sees_the_agent_store_under_a_prefix_of_its_own(monkeypatch):
    from datetime import timedelta

    import torch.distributed as dist

    from pyprotoclip import distributed as pdist

    server = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=timedelta(seconds=5))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(server.port))
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    assert pdist._restart_store() is None  # not under torchrun
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")
    assert pdist._restart_store() is None  # rank 0 hosts a fresh store each time
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    server.set("rank_1", "an address of the killed worker")
    store = pdist._restart_store()
    store.set("rank_1", "the restarted worker's")
    assert server.get("pyprotoclip/attempt_1/rank_1") == b"the restarted worker's"
    assert server.get("rank_1") == b"an address of the killed worker"
