"""pyprotoclip's trainer against open_clip's own (``open_clip_train.main``): the same shards, model, flags and
threads, run alternately (A B A B ...), so both see the same machine load. Writes
benchmarks/results/train-vs-open_clip-<machine>.json and a PNG drawn from it.

    python tools/bench_train.py                 # 3 pairs of 3-epoch CLIP runs, 2048 samples, tiny-rn, 1 thread
    python tools/bench_train.py --quick         # one pair of 1-epoch runs (to the ignored benchmarks/results/quick/)
    pyprotoclip bench train [same options]

Two numbers per run: end to end (samples / wall time of the whole command: imports, data set-up, training,
exit) and the training phase (samples between the first and the last progress line of the epochs / the time
between them, from each trainer's own log timestamps; 1 s resolution). The headline is the ratio of medians
over the pairs, pyprotoclip / open_clip, and the range of the per-pair ratios.

open_clip_train needs packages that pyprotoclip does not (pandas, and a webdataset <= 0.2.86: newer ones break
its tar reader). They are installed once with ``pip install --target`` into benchmarks/.open_clip_train-deps/
and put on open_clip_train's PYTHONPATH only; pyprotoclip's environment is not touched. The synthetic data is
written once per size to benchmarks/.bench-train-data/ (both ignored by git).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "tools"), ROOT]
import benchlib  # noqa: E402

DEPS = os.path.join(ROOT, "benchmarks", ".open_clip_train-deps")
DEP_SPECS = ("pandas", "webdataset>=0.2.5,<=0.2.86")
DATA = os.path.join(ROOT, "benchmarks", ".bench-train-data")
# open_clip_train with pyprotoclip imported first: its tiny built-in configs join open_clip's registry
OPEN_CLIP_MAIN = "import sys, pyprotoclip; from open_clip_train.main import main; main(sys.argv[1:])"

_OURS_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) .*Train Epoch: (\d+) \[\s*(\d+)/(\d+)")
_THEIRS_LINE = re.compile(r"^(\d{4}-\d\d-\d\d,\d\d:\d\d:\d\d) .*Train Epoch: (\d+) \[\s*(\d+)/(\d+)")


def ensure_deps() -> None:
    """pandas and an old webdataset for open_clip_train, in a directory of their own."""
    probe = [sys.executable, "-c", "import pandas, webdataset, open_clip_train.main; "
             "assert tuple(map(int, webdataset.__version__.split('.')[:3])) <= (0, 2, 86)"]
    if subprocess.run(probe, env={**os.environ, "PYTHONPATH": DEPS}, capture_output=True).returncode == 0:
        return
    print(f"installing {', '.join(DEP_SPECS)} for open_clip_train into {DEPS} (once)", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", DEPS, *DEP_SPECS,
                    "python-dateutil", "tzdata", "six"], check=True)
    if subprocess.run(probe, env={**os.environ, "PYTHONPATH": DEPS}, capture_output=True).returncode != 0:
        sys.exit(f"open_clip_train still does not import with {DEPS} on its path; is open_clip_torch installed?")


def ensure_data(samples: int, image_size: int) -> str:
    """The brace spec of a synthetic training set of ``samples`` samples (written once)."""
    out = os.path.join(DATA, f"n{samples}-s{image_size}")
    info = os.path.join(out, "info.json")
    if not os.path.isfile(info):
        from pyprotoclip.data import write_synthetic_dataset

        write_synthetic_dataset(out, samples, image_size=image_size, samples_per_shard=256, num_val=0, num_ood=0,
                                progress=False, processes=1)
    shards = sorted(f for f in os.listdir(os.path.join(out, "train")) if f.endswith(".tar"))
    return os.path.join(out, "train", "{%s..%s}" % (shards[0][:-4], shards[-1][:-4]) + ".tar")


def common_flags(a: argparse.Namespace, spec: str, logs: str, name: str) -> list[str]:
    return ["--train-data", spec, "--train-num-samples", str(a.samples), "--model", a.model, "--batch-size",
            str(a.batch_size), "--epochs", str(a.epochs), "--workers", str(a.workers), "--lr", "1e-3", "--warmup", "10",
            "--precision", "fp32", "--logs", logs, "--name", name, "--seed", "0", "--save-frequency", "0",
            "--zeroshot-frequency", "0", "--log-every-n-steps", str(a.log_every), "--device", "cpu"]


def command(trainer: str, a: argparse.Namespace, spec: str, logs: str, name: str) -> tuple[list[str], dict[str, str]]:
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads), "PYTHONPATH": ROOT}
    flags = common_flags(a, spec, logs, name)
    if trainer == "pyprotoclip":
        return [sys.executable, "-m", "pyprotoclip", "train", *flags], env
    env["PYTHONPATH"] = os.pathsep.join([DEPS, ROOT])
    return [sys.executable, "-c", OPEN_CLIP_MAIN, *flags, "--dataset-type", "webdataset"], env


def training_phase(log_text: str, trainer: str, samples_per_epoch: int) -> float | None:
    """Samples/s between the first and the last progress line of the run (from the log's timestamps)."""
    pattern, fmt = (_OURS_LINE, "%Y-%m-%d %H:%M:%S") if trainer == "pyprotoclip" else (_THEIRS_LINE, "%Y-%m-%d,%H:%M:%S")
    points = []
    for line in log_text.splitlines():
        m = pattern.match(line)
        if m:
            t = dt.datetime.strptime(m.group(1), fmt).timestamp()
            points.append((t, int(m.group(2)) * samples_per_epoch + int(m.group(3))))
    if len(points) < 2 or points[-1][0] <= points[0][0]:
        return None
    return (points[-1][1] - points[0][1]) / (points[-1][0] - points[0][0])


def run_one(trainer: str, a: argparse.Namespace, spec: str, logs: str, name: str) -> dict[str, float | None]:
    cmd, env = command(trainer, a, spec, logs, name)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=logs)
    wall = time.perf_counter() - t0
    text = r.stdout + r.stderr
    if r.returncode != 0:
        sys.exit(f"{trainer} failed (exit {r.returncode}):\n{text[-3000:]}")
    log_path = os.path.join(logs, name, "out.log")
    if os.path.isfile(log_path):
        with open(log_path) as f:
            text += "\n" + f.read()
    total = a.samples * a.epochs
    return {"wall_s": wall, "end_to_end_samples_per_s": total / wall,
            "training_samples_per_s": training_phase(text, trainer, a.samples)}


def plot(rows: list[dict], summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, title in zip(axes, ("end_to_end_samples_per_s", "training_samples_per_s"), ("end to end", "training phase")):
        for trainer, color in (("pyprotoclip", "tab:blue"), ("open_clip_train", "tab:orange")):
            ys = [r[trainer][key] for r in rows]
            ax.plot(range(1, len(ys) + 1), ys, "o-", color=color, label=trainer)
        ax.set_title(f"{title}: ratio {summary[key]['ratio_of_medians']:.3f}")
        ax.set_xlabel("pair")
        ax.set_ylabel("samples/s")
        ax.legend(fontsize=8)
    fig.suptitle(summary["setting"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=2048, help="samples per epoch (synthetic data)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=3, help="interleaved pyprotoclip / open_clip_train pairs")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="OMP/MKL threads of each trainer")
    ap.add_argument("--model", default="tiny-rn")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--log-every", type=int, default=8, help="progress line every N steps (both trainers)")
    ap.add_argument("--quick", action="store_true", help="one pair of 1-epoch runs, results to benchmarks/results/quick/")
    ap.add_argument("--out", default=None, help="results JSON (default: benchmarks/results/train-vs-open_clip-<machine>.json)")
    a = ap.parse_args()
    if a.quick:
        a.pairs, a.epochs = 1, 1
    ensure_deps()
    spec = ensure_data(a.samples, a.image_size)
    import torch

    torch.set_num_threads(a.threads)
    env = benchlib.environment("cpu")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-train-") as logs:
        for i in range(a.pairs):
            order = ("pyprotoclip", "open_clip_train") if i % 2 == 0 else ("open_clip_train", "pyprotoclip")
            row: dict = {"pair": i}
            for trainer in order:
                row[trainer] = run_one(trainer, a, spec, logs, f"{trainer}-{i}")
                print(f"pair {i} {trainer:16s} wall {row[trainer]['wall_s']:6.1f} s | end to end "
                      f"{row[trainer]['end_to_end_samples_per_s']:6.1f} samples/s | training "
                      f"{row[trainer]['training_samples_per_s'] or float('nan'):6.1f} samples/s", flush=True)
            rows.append(row)
    summary: dict = {"setting": f"{a.model}, {a.samples} samples x {a.epochs} epochs, batch {a.batch_size}, "
                                f"{a.workers} worker(s), {a.threads} thread(s), fp32, CPU; {a.pairs} interleaved pair(s)"}
    lines = []
    for key in ("end_to_end_samples_per_s", "training_samples_per_s"):
        ours = [r["pyprotoclip"][key] for r in rows if r["pyprotoclip"][key] and r["open_clip_train"][key]]
        theirs = [r["open_clip_train"][key] for r in rows if r["pyprotoclip"][key] and r["open_clip_train"][key]]
        if not ours:
            summary[key] = {"ratio_of_medians": float("nan")}
            continue
        per_pair = [o / t for o, t in zip(ours, theirs)]
        summary[key] = {"pyprotoclip_median": statistics.median(ours), "open_clip_train_median": statistics.median(theirs),
                        "ratio_of_medians": statistics.median(ours) / statistics.median(theirs),
                        "per_pair_ratios": per_pair}
        lines.append(f"{key.replace('_', ' ')}: pyprotoclip / open_clip_train = {summary[key]['ratio_of_medians']:.3f} "
                     f"(medians {statistics.median(ours):.1f} vs {statistics.median(theirs):.1f}; per pair "
                     f"{min(per_pair):.3f}-{max(per_pair):.3f})")
    env.update(summary=lines, setting=summary["setting"])
    tag = benchlib.device_tag("cpu")
    out = a.out or os.path.join(ROOT, "benchmarks", "results", *(["quick"] if a.quick else []), f"train-vs-open_clip-{tag}.json")
    benchlib.write_results(out, rows + [{"summary": summary}], env)
    plot(rows, summary, out[:-5] + ".png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
