"""A built-in, procedurally generated image-caption dataset in img2dataset's webdataset layout.

Every image shows one main object (a *kind* such as circle or star, drawn in one of a few *colours*, with a size,
position, rotation and texture) on a background, sometimes next to a small distractor object. The class of an image
is ``"<colour> <kind>"``; captions are built from varied templates that always name colour and kind and mention a
random subset of the other attributes. The ``ood`` split uses object kinds that never occur in ``train``/``val``.

Generation is deterministic: sample ``i`` of split ``s`` is drawn from ``SeedSequence([seed, s, i])`` alone, so the
bytes written do not depend on the number of processes or on the shard size, and tar headers carry fixed metadata.

Layout written by :func:`write_synthetic_dataset` (see ``docs`` in the data contract)::

    DIR/train/00000.tar ... sizes.json      keys: jpg, txt, cls, json
    DIR/val/...  DIR/ood/...
    DIR/classnames.txt  DIR/templates.txt  (also copied into train/ and val/)
    DIR/ood_classnames.txt  (also copied into ood/ as classnames.txt, with templates.txt)
    DIR/info.json
"""

from __future__ import annotations

import io
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import tarfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

GENERATOR_VERSION = 1

# Object kinds. Training classes are TRAIN_KINDS x COLOURS; OOD classes are OOD_KINDS x COLOURS; the clutter kinds
# only appear as small distractors, never as the main object, so they are no class of either split.
TRAIN_KINDS = ("circle", "square", "triangle", "star", "cross")
OOD_KINDS = ("heart", "crescent", "arrow")
CLUTTER_KINDS = ("ring", "diamond", "hexagon")

# name -> hue in degrees (HSV); saturation and value are jittered per image.
COLOURS = {"red": 0.0, "yellow": 55.0, "green": 125.0, "blue": 225.0}
HUE_JITTER = 12.0

TEXTURES = ("solid", "stripes", "dots", "checker")
TEXTURE_WORDS = {
    "solid": ("solid", "plain", "filled"),
    "stripes": ("striped", "stripy"),
    "dots": ("dotted", "spotted", "polka-dot"),
    "checker": ("checkered", "chequered"),
}
BACKGROUNDS = ("plain", "gradient", "noise", "split")
BACKGROUND_WORDS = {
    "plain": ("plain", "uniform", "flat"),
    "gradient": ("gradient", "fading", "shaded"),
    "noise": ("noisy", "grainy", "speckled"),
    "split": ("two-tone", "split", "divided"),
}
SIZE_WORDS = {"small": ("small", "tiny", "little"), "medium": ("medium", "medium-sized", "mid-sized"), "large": ("large", "big", "huge")}
POSITIONS = (("top left", "top", "top right"), ("left", "center", "right"), ("bottom left", "bottom", "bottom right"))

# Caption templates. {o} is the object phrase "<colour> <kind>" possibly with size/texture words before it.
CAPTION_TEMPLATES = (
    "a {o}",
    "a {o}.",
    "a photo of a {o}",
    "a drawing of a {o}",
    "an image of a {o}",
    "a {o} on a {bg} background",
    "a {o} in the {pos}",
    "a {o} in the {pos} of the image",
    "there is a {o} in the {pos}",
    "a {o} placed {pos_adv} on a {bg} background",
    "{o_cap} on a {bg} background",
    "picture of a {o}, {bg} background",
    "a {bg} background with a {o} in the {pos}",
    "this image shows a {o}",
    "a simple rendering of a {o}",
    "a {kind} coloured {colour}",
    "a {kind} in {colour} on a {bg} background",
    "a {size} {kind} that is {colour}",
)
# zero-shot prompts, one per line in templates.txt
ZEROSHOT_TEMPLATES = (
    "a {}.",
    "a photo of a {}.",
    "a drawing of a {}.",
    "an image of a {}.",
    "a rendering of a {}.",
    "a {} on a background.",
    "a picture showing a {}.",
    "there is a {} in the image.",
)
SPLIT_CODES = {"train": 0, "val": 1, "ood": 2}


def class_names(kinds: tuple[str, ...] = TRAIN_KINDS) -> list[str]:
    """Class names ``"<colour> <kind>"`` in label order (kind-major)."""
    return [f"{c} {k}" for k in kinds for c in COLOURS]


def _unit_polygon(kind: str) -> np.ndarray | None:
    """(V, 2) vertices on roughly the unit disk for polygonal kinds; None for kinds drawn with ellipses."""
    if kind in ("circle", "ring", "crescent"):
        return None
    if kind == "square":
        a = math.sqrt(0.5)
        return np.array([[-a, -a], [a, -a], [a, a], [-a, a]])
    if kind == "triangle":
        t = np.deg2rad([-90, 30, 150])
        return np.stack([np.cos(t), np.sin(t)], 1)
    if kind == "diamond":
        return np.array([[0, -1], [0.62, 0], [0, 1], [-0.62, 0]])
    if kind == "hexagon":
        t = np.deg2rad(np.arange(6) * 60)
        return np.stack([np.cos(t), np.sin(t)], 1)
    if kind == "star":
        t = np.deg2rad(np.arange(10) * 36 - 90)
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        return np.stack([r * np.cos(t), r * np.sin(t)], 1)
    if kind == "cross":
        a, b = 0.95, 0.32
        return np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a], [-b, b], [-a, b], [-a, -b], [-b, -b]])
    if kind == "arrow":
        return np.array([[-0.95, -0.25], [0.15, -0.25], [0.15, -0.7], [0.95, 0.0], [0.15, 0.7], [0.15, 0.25], [-0.95, 0.25]])
    if kind == "heart":
        t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        pts = np.stack([x, y + 2.5], 1) / 17.0
        return pts
    raise ValueError(f"kind: unknown object kind {kind!r}")


_POLYS = {k: _unit_polygon(k) for k in TRAIN_KINDS + OOD_KINDS + CLUTTER_KINDS}


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    """h in degrees, s and v in [0, 1] -> (3,) float RGB in [0, 255]."""
    h = (h % 360.0) / 60.0
    i = int(h) % 6
    f = h - int(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb) * 255.0


def _draw_alpha(kind: str, size: int, cx: float, cy: float, r: float, rot: float, outline: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Coverage in [0, 1] of one object, (size, size) float32, centred at (cx, cy) with radius r (pixels) and
    rotation rot (radians); with ``outline`` also the coverage of a thin border inside the object."""
    # drawn at 2x and box-reduced: cheap anti-aliasing
    S, cx, cy, r = 2 * size, 2 * cx, 2 * cy, 2 * r
    im = Image.new("L", (S, S), 0)
    d = ImageDraw.Draw(im)
    if kind == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif kind == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        ri = r * 0.55
        d.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
    elif kind == "crescent":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        ox, oy = 0.45 * r * math.cos(rot), 0.45 * r * math.sin(rot)
        ri = r * 0.85
        d.ellipse([cx + ox - ri, cy + oy - ri, cx + ox + ri, cy + oy + ri], fill=0)
    else:
        pts = _POLYS[kind]
        c, s = math.cos(rot), math.sin(rot)
        x = cx + r * (pts[:, 0] * c - pts[:, 1] * s)
        y = cy + r * (pts[:, 0] * s + pts[:, 1] * c)
        d.polygon(list(zip(x.tolist(), y.tolist())), fill=255)
    edge = None
    if outline:
        m = np.asarray(im) > 127
        inner = m.copy()
        inner[1:] &= m[:-1]
        inner[:-1] &= m[1:]
        inner[:, 1:] &= m[:, :-1]
        inner[:, :-1] &= m[:, 1:]
        e = Image.fromarray(((m & ~inner) * np.uint8(255)), "L").reduce(2)
        edge = np.asarray(e, dtype=np.float32) * (1.0 / 255.0)
    alpha = np.asarray(im.reduce(2), dtype=np.float32) * (1.0 / 255.0)
    return alpha, edge


_GRID_CACHE: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    if size not in _GRID_CACHE:
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + np.float32(0.5)
        _GRID_CACHE[size] = (yy, xx)
    return _GRID_CACHE[size]


def _texture(rng: np.random.Generator, kind: str, size: int, base: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    """(size, size, 3) float32 fill for a texture; base is the (3,) float32 object colour."""
    # the second colour stays close to the object's hue (a tint or shade) so the texture never changes the colour name
    if rng.random() < 0.5:
        other = base + (255.0 - base) * np.float32(rng.uniform(0.45, 0.7))
    else:
        other = base * np.float32(rng.uniform(0.3, 0.55))
    if kind == "solid":
        return np.broadcast_to(base, (size, size, 3))
    yy, xx = _grid(size)
    period = max(1.6, r * rng.uniform(0.35, 0.7))
    if kind == "stripes":
        a = rng.uniform(0, np.pi)
        u = (xx * np.float32(math.cos(a) / period) + yy * np.float32(math.sin(a) / period))
        sel = (np.floor(u) % 2) == 0
    elif kind == "checker":
        a = rng.uniform(0, np.pi / 2)
        c, s = np.float32(math.cos(a) / period), np.float32(math.sin(a) / period)
        u = np.floor(xx * c + yy * s)
        v = np.floor(yy * c - xx * s)
        sel = ((u + v) % 2) == 0
    elif kind == "dots":
        u = ((xx - np.float32(cx)) * np.float32(1 / period)) % 1.0 - 0.5
        v = ((yy - np.float32(cy)) * np.float32(1 / period)) % 1.0 - 0.5
        sel = (u * u + v * v) < 0.09
    else:
        raise ValueError(f"texture: unknown {kind!r}")
    return np.where(sel[..., None], base, other)


def _background(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    """(size, size, 3) float32 background: muted colours (low saturation) so the object's colour stays the salient one."""
    def muted() -> np.ndarray:
        return _hsv_to_rgb(rng.uniform(0, 360), rng.uniform(0.0, 0.3), rng.uniform(0.25, 0.95)).astype(np.float32)

    c1 = muted()
    if kind == "plain":
        return np.broadcast_to(c1, (size, size, 3)).copy()
    yy, xx = _grid(size)
    if kind == "gradient":
        c2 = muted()
        a = rng.uniform(0, 2 * np.pi)
        t = xx * np.float32(math.cos(a)) + yy * np.float32(math.sin(a))
        lo, hi = float(t.min()), float(t.max())
        t = ((t - lo) * np.float32(1.0 / max(hi - lo, 1e-6)))[..., None]
        return c1 + (c2 - c1) * t
    if kind == "noise":
        noise = rng.normal(0.0, rng.uniform(12, 30), size=(size, size, 1)).astype(np.float32)
        return c1 + noise
    if kind == "split":
        c2 = muted()
        a = rng.uniform(0, 2 * np.pi)
        off = rng.uniform(0.3, 0.7) * size
        sel = ((xx - size / 2) * math.cos(a) + (yy - size / 2) * math.sin(a) + size / 2) < off
        return np.where(sel[..., None], c1, c2)
    raise ValueError(f"background: unknown {kind!r}")


@dataclass(frozen=True)
class _SplitSpec:
    name: str
    kinds: tuple[str, ...]


def render_sample(seed: int, split: str, index: int, image_size: int = 64) -> tuple[Image.Image, str, int, dict[str, Any]]:
    """Draw sample ``index`` of ``split`` ('train', 'val' or 'ood') deterministically from ``seed``.

    Returns (RGB PIL image of image_size x image_size, caption, class label, attribute dict). The label indexes
    ``class_names(TRAIN_KINDS)`` for train/val and ``class_names(OOD_KINDS)`` for ood.
    """
    if split not in SPLIT_CODES:
        raise ValueError(f"split: expected one of {sorted(SPLIT_CODES)}, got {split!r}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), SPLIT_CODES[split], int(index)]))
    kinds = OOD_KINDS if split == "ood" else TRAIN_KINDS
    colours = list(COLOURS)
    kind_i = int(rng.integers(len(kinds)))
    col_i = int(rng.integers(len(colours)))
    kind, colour = kinds[kind_i], colours[col_i]
    label = kind_i * len(colours) + col_i

    S = image_size
    frac = float(rng.uniform(0.12, 0.42))
    r = frac * S
    margin = r * 0.8  # objects may be cut by the border a little
    cx = float(rng.uniform(margin, S - margin))
    cy = float(rng.uniform(margin, S - margin))
    rot = float(rng.uniform(0, 2 * np.pi))
    size_word = "small" if frac < 0.2 else ("medium" if frac < 0.31 else "large")
    pos = POSITIONS[min(int(3 * cy / S), 2)][min(int(3 * cx / S), 2)]

    hue = COLOURS[colour] + rng.uniform(-HUE_JITTER, HUE_JITTER)
    # yellow looks brown when dark, so its value floor is higher
    vmin = 0.8 if colour == "yellow" else 0.55
    base = _hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(vmin, 1.0)).astype(np.float32)
    texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
    bg_kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]

    img = _background(rng, bg_kind, S)

    distractor = None
    if rng.random() < 0.35:
        dkind = CLUTTER_KINDS[int(rng.integers(len(CLUTTER_KINDS)))]
        dcol = colours[int(rng.integers(len(colours)))]
        dr = float(rng.uniform(0.07, 0.12)) * S
        # place it in the quadrant farthest from the main object so it rarely overlaps
        dx = float(rng.uniform(dr, S / 2 - dr)) + (0 if cx > S / 2 else S / 2)
        dy = float(rng.uniform(dr, S / 2 - dr)) + (0 if cy > S / 2 else S / 2)
        drgb = _hsv_to_rgb(COLOURS[dcol] + rng.uniform(-HUE_JITTER, HUE_JITTER), rng.uniform(0.6, 1.0), rng.uniform(0.8, 1.0)).astype(np.float32)
        da, _ = _draw_alpha(dkind, S, dx, dy, dr, float(rng.uniform(0, 2 * np.pi)))
        da = da[..., None]
        img = img + (drgb - img) * da
        distractor = {"kind": dkind, "colour": dcol}

    fill = _texture(rng, texture, S, base, cx, cy, r)
    outline = bool(rng.random() < 0.5)  # a thin outline now and then, as drawings have
    alpha, edge = _draw_alpha(kind, S, cx, cy, r, rot, outline=outline)
    img = img + (fill - img) * alpha[..., None]
    if edge is not None:
        img = img + (base * np.float32(0.35) - img) * edge[..., None]

    arr = np.clip(img, 0, 255).astype(np.uint8)
    image = Image.fromarray(arr, "RGB")

    # caption
    w = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731
    words = {
        "colour": colour,
        "kind": kind,
        "size": w(SIZE_WORDS[size_word]),
        "texture": w(TEXTURE_WORDS[texture]),
        "bg": w(BACKGROUND_WORDS[bg_kind]),
        "pos": pos,
        "pos_adv": "in the " + pos,
    }
    adjs = []
    if rng.random() < 0.5:
        adjs.append(words["size"])
    if rng.random() < 0.5:
        adjs.append(words["texture"])
    words["o"] = " ".join(adjs + [colour, kind])
    words["o_cap"] = "a " + words["o"]
    caption = w(CAPTION_TEMPLATES).format(**words)
    if distractor is not None and rng.random() < 0.6:
        caption = caption.rstrip(".") + f" next to a small {distractor['colour']} {distractor['kind']}"

    attrs = {
        "split": split,
        "class": f"{colour} {kind}",
        "label": label,
        "kind": kind,
        "colour": colour,
        "rgb": [int(v) for v in np.clip(base, 0, 255)],
        "size": size_word,
        "radius": round(frac, 4),
        "cx": round(cx / S, 4),
        "cy": round(cy / S, 4),
        "position": pos,
        "rotation_deg": round(math.degrees(rot), 2),
        "texture": texture,
        "background": bg_kind,
        "distractor": distractor,
    }
    return image, caption, label, attrs


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # fixed metadata: identical inputs give byte-identical tar files
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mtime = 0
    ti.mode = 0o444
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = "pyprotoclip"
    tar.addfile(ti, io.BytesIO(data))


def _write_shard(task: tuple[str, str, int, int, int, int]) -> tuple[str, int]:
    """Write samples [start, stop) of a split into one tar (via a temp file + rename). Returns (path, count)."""
    path, split, seed, start, stop, image_size = task
    tmp = path + ".tmp"
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(start, stop):
            image, caption, label, attrs = render_sample(seed, split, i, image_size)
            buf = io.BytesIO()
            image.save(buf, format="JPEG", quality=92)
            key = f"{i:09d}"
            _add_member(tar, key + ".jpg", buf.getvalue())
            _add_member(tar, key + ".txt", caption.encode("utf-8"))
            _add_member(tar, key + ".cls", str(label).encode("ascii"))
            _add_member(tar, key + ".json", json.dumps(attrs, sort_keys=True).encode("utf-8"))
    os.replace(tmp, path)
    return path, stop - start


def _brace_spec(split_dir: str, n_shards: int) -> str:
    if n_shards == 1:
        return os.path.join(split_dir, "00000.tar")
    return os.path.join(split_dir, "{00000..%05d}.tar" % (n_shards - 1))


def _write_lines(path: str, lines: list[str] | tuple[str, ...]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def _default_eval_count(num_samples: int) -> int:
    return int(min(5000, max(200, num_samples // 10)))


def write_synthetic_dataset(
    out_dir: str,
    num_samples: int,
    *,
    seed: int = 0,
    image_size: int = 64,
    samples_per_shard: int = 1000,
    num_val: int | None = None,
    num_ood: int | None = None,
    progress: bool = True,
    processes: int | None = None,
) -> dict[str, Any]:
    """Write the synthetic dataset (train, val and ood splits) as webdataset shards under ``out_dir``.

    num_samples: training samples. num_val / num_ood: held-out samples of the training classes / of classes never
    seen in training (default: num_samples // 10, clamped to [200, 5000]). processes: shard-writing processes
    (default: the CPU count). Returns a summary dict (paths, shard specs, counts, class lists, seconds).
    An existing dataset in ``out_dir`` (one with info.json) is replaced; any other non-empty directory is refused.
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples: expected a positive int, got {num_samples!r}")
    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size: expected an int >= 8, got {image_size!r}")
    if not isinstance(samples_per_shard, int) or samples_per_shard < 1:
        raise ValueError(f"samples_per_shard: expected a positive int, got {samples_per_shard!r}")
    num_val = _default_eval_count(num_samples) if num_val is None else num_val
    num_ood = _default_eval_count(num_samples) if num_ood is None else num_ood
    for name, v in (("num_val", num_val), ("num_ood", num_ood)):
        if not isinstance(v, int) or v < 0:
            raise ValueError(f"{name}: expected an int >= 0, got {v!r}")

    out_dir = os.path.abspath(out_dir)
    if os.path.isfile(out_dir):
        raise ValueError(f"out_dir: {out_dir} is a file, expected a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.exists(os.path.join(out_dir, "info.json")):
        raise ValueError(f"out_dir: {out_dir} is not empty and holds no synthetic dataset (info.json); refusing to write into it")
    os.makedirs(out_dir, exist_ok=True)

    t0 = time.perf_counter()
    counts = {"train": num_samples, "val": num_val, "ood": num_ood}
    tasks = []
    specs: dict[str, str | None] = {}
    shard_sizes: dict[str, dict[str, int]] = {}
    for split, n in counts.items():
        split_dir = os.path.join(out_dir, split)
        if os.path.isdir(split_dir):
            shutil.rmtree(split_dir)
        if n == 0:
            specs[split] = None
            continue
        os.makedirs(split_dir)
        n_shards = (n + samples_per_shard - 1) // samples_per_shard
        specs[split] = _brace_spec(split_dir, n_shards)
        shard_sizes[split] = {}
        for s in range(n_shards):
            start, stop = s * samples_per_shard, min(n, (s + 1) * samples_per_shard)
            path = os.path.join(split_dir, f"{s:05d}.tar")
            shard_sizes[split][os.path.basename(path)] = stop - start
            tasks.append((path, split, int(seed), start, stop, image_size))

    # big shards first so the pool finishes evenly
    tasks.sort(key=lambda t: -(t[4] - t[3]))
    processes = processes or os.cpu_count() or 1
    processes = max(1, min(processes, len(tasks)))
    done_samples, total = 0, sum(counts.values())
    if processes == 1:
        results = map(_write_shard, tasks)
        pool = None
    else:
        pool = mp.get_context("fork" if sys.platform != "win32" else "spawn").Pool(processes)
        results = pool.imap_unordered(_write_shard, tasks)
    tty = sys.stderr.isatty()
    next_report = 0.0
    try:
        for _, n in results:
            done_samples += n
            # one line per 10% when stderr is a log file, a live line on a terminal
            if progress and (tty or done_samples >= next_report or done_samples == total):
                next_report = done_samples + total / 10
                el = time.perf_counter() - t0
                print(f"{chr(13) if tty else ''}synthetic: {done_samples}/{total} samples ({done_samples / max(el, 1e-9):.0f}/s)",
                      end="" if tty else "\n", file=sys.stderr, flush=True)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    if progress and tty:
        print(file=sys.stderr)

    classnames = class_names(TRAIN_KINDS)
    ood_classnames = class_names(OOD_KINDS)
    for split, sizes in shard_sizes.items():
        with open(os.path.join(out_dir, split, "sizes.json"), "w") as f:
            json.dump(sizes, f, indent=1, sort_keys=True)
    _write_lines(os.path.join(out_dir, "classnames.txt"), classnames)
    _write_lines(os.path.join(out_dir, "templates.txt"), ZEROSHOT_TEMPLATES)
    _write_lines(os.path.join(out_dir, "ood_classnames.txt"), ood_classnames)
    for split in ("train", "val"):
        if split in shard_sizes:
            _write_lines(os.path.join(out_dir, split, "classnames.txt"), classnames)
            _write_lines(os.path.join(out_dir, split, "templates.txt"), ZEROSHOT_TEMPLATES)
    if "ood" in shard_sizes:
        # the ood split's own class names sit beside its shards, so zero-shot on ood finds the right ones
        _write_lines(os.path.join(out_dir, "ood", "classnames.txt"), ood_classnames)
        _write_lines(os.path.join(out_dir, "ood", "templates.txt"), ZEROSHOT_TEMPLATES)

    seconds = time.perf_counter() - t0
    info = {
        "generator": "pyprotoclip.data.synthetic",
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "image_size": image_size,
        "samples_per_shard": samples_per_shard,
        "num_train": num_samples,
        "num_val": num_val,
        "num_ood": num_ood,
        "train_shards": specs["train"],
        "val_shards": specs["val"],
        "ood_shards": specs["ood"],
        "classnames": classnames,
        "ood_classnames": ood_classnames,
        "templates": list(ZEROSHOT_TEMPLATES),
        "train_kinds": list(TRAIN_KINDS),
        "ood_kinds": list(OOD_KINDS),
        "colours": list(COLOURS),
        "keys": ["jpg", "txt", "cls", "json"],
    }
    with open(os.path.join(out_dir, "info.json"), "w") as f:
        json.dump(info, f, indent=1)
    total_samples = num_samples + num_val + num_ood
    return {
        "out_dir": out_dir,
        **{k: info[k] for k in ("train_shards", "val_shards", "ood_shards", "num_train", "num_val", "num_ood", "classnames", "ood_classnames")},
        "info": os.path.join(out_dir, "info.json"),
        "seconds": seconds,
        "samples_per_s": total_samples / max(seconds, 1e-9),
        "processes": processes,
    }
