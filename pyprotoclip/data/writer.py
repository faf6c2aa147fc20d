"""Writing webdataset shards: a shard writer with reproducible tar headers, and the CSV / ImageFolder converters."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import tarfile
import time
from typing import Any, Callable, Iterable, Iterator

from PIL import Image

IMAGE_FILE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# formats written as they are; anything else is re-encoded as JPEG
_KEEP_FORMATS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}

DEFAULT_FOLDER_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {}.")


class ShardWriter:
    """Writes samples ({"__key__": str, ext: bytes | str}) into ``out_dir/00000.tar, 00001.tar, ...`` with
    ``samples_per_shard`` each, and ``sizes.json`` ({shard file name: count}) on :meth:`close`.

    Tar members carry fixed metadata (mtime 0, uid 0, mode 0444), so the same samples give the same bytes.
    """

    def __init__(self, out_dir: str, samples_per_shard: int = 1000):
        if not isinstance(samples_per_shard, int) or samples_per_shard < 1:
            raise ValueError(f"samples_per_shard: expected a positive int, got {samples_per_shard!r}")
        self.out_dir = os.path.abspath(out_dir)
        os.makedirs(self.out_dir, exist_ok=True)
        self.samples_per_shard = samples_per_shard
        self.sizes: dict[str, int] = {}
        self._tar: tarfile.TarFile | None = None
        self._name: str | None = None
        self._count = 0
        self.total = 0

    def _next_shard(self) -> None:
        self._finish_shard()
        self._name = f"{len(self.sizes):05d}.tar"
        self.sizes[self._name] = 0
        self._tar = tarfile.open(os.path.join(self.out_dir, self._name + ".tmp"), "w", format=tarfile.USTAR_FORMAT)
        self._count = 0

    def _finish_shard(self) -> None:
        if self._tar is not None:
            self._tar.close()
            os.replace(os.path.join(self.out_dir, self._name + ".tmp"), os.path.join(self.out_dir, self._name))
            self._tar = None

    def write(self, sample: dict[str, Any]) -> None:
        key = sample.get("__key__")
        if not isinstance(key, str) or not key or "." in os.path.basename(key):
            raise ValueError(f"sample: expected a '__key__' string without '.', got {key!r}")
        if self._tar is None or self._count >= self.samples_per_shard:
            self._next_shard()
        for ext in sorted(k for k in sample if k != "__key__"):
            value = sample[ext]
            data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
            ti = tarfile.TarInfo(f"{key}.{ext}")
            ti.size, ti.mtime, ti.mode, ti.uid, ti.gid = len(data), 0, 0o444, 0, 0
            ti.uname = ti.gname = "pyprotoclip"
            self._tar.addfile(ti, io.BytesIO(data))
        self._count += 1
        self.sizes[self._name] += 1
        self.total += 1

    def close(self) -> dict[str, int]:
        self._finish_shard()
        with open(os.path.join(self.out_dir, "sizes.json"), "w") as f:
            json.dump(self.sizes, f, indent=1, sort_keys=True)
        return dict(self.sizes)

    def spec(self) -> str:
        """Brace spec of the shards written so far."""
        n = len(self.sizes)
        if n <= 1:
            return os.path.join(self.out_dir, "00000.tar")
        return os.path.join(self.out_dir, "{00000..%05d}.tar" % (n - 1))

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _image_member(path: str) -> tuple[str, bytes]:
    """(extension, bytes) for an image file: jpg/png/webp as they are (after checking PIL can read them), other
    formats re-encoded as JPEG. Raises OSError/ValueError for files PIL cannot read."""
    ext = os.path.splitext(path)[1].lower()
    with open(path, "rb") as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if ext in _KEEP_FORMATS and (im.format or "").upper() in ("JPEG", "PNG", "WEBP"):
            return {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[im.format.upper()], data
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="JPEG", quality=95)
        return "jpg", buf.getvalue()


class _Progress:
    def __init__(self, label: str, total: int | None, enabled: bool):
        self.label, self.total, self.enabled = label, total, enabled
        self.tty = sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self.next = 0

    def __call__(self, done: int, bad: int, final: bool = False) -> None:
        if not self.enabled:
            return
        if not (final or self.tty or done >= self.next):
            return
        step = max(1, (self.total or 10000) // 10)
        self.next = done + step
        rate = done / max(time.perf_counter() - self.t0, 1e-9)
        of = f"/{self.total}" if self.total else ""
        end = "" if (self.tty and not final) else "\n"
        print(f"{chr(13) if self.tty else ''}{self.label}: {done}{of} samples written, {bad} skipped ({rate:.0f}/s)", end=end, file=sys.stderr, flush=True)


def _write_samples(rows: Iterable[tuple[str, str, str, int | None]], out_dir: str, samples_per_shard: int, total: int | None,
                   label: str, progress: bool, extra: Callable[[tuple], dict[str, Any]] | None = None) -> dict[str, Any]:
    """rows: (key, image path, caption, class index or None). Unreadable images are skipped and reported."""
    prog = _Progress(label, total, progress)
    bad: list[str] = []
    with ShardWriter(out_dir, samples_per_shard) as w:
        for row in rows:
            key, path, caption, cls = row
            try:
                ext, data = _image_member(path)
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                bad.append(f"{path}: {type(exc).__name__}: {exc}")
                prog(w.total, len(bad))
                continue
            sample: dict[str, Any] = {"__key__": key, ext: data, "txt": caption}
            if cls is not None:
                sample["cls"] = str(cls)
            if extra is not None:
                sample.update(extra(row))
            w.write(sample)
            prog(w.total, len(bad))
    prog(w.total, len(bad), final=True)
    if bad:
        print(f"{label}: skipped {len(bad)} unreadable image(s), e.g. {bad[0]}", file=sys.stderr)
    if w.total == 0:
        raise ValueError(f"{label}: no sample could be written (all {len(bad)} image(s) unreadable)")
    return {"out_dir": w.out_dir, "shards": w.spec(), "num_samples": w.total, "num_shards": len(w.sizes), "skipped": bad}


def csv_rows(csv_path: str, *, img_key: str = "filepath", caption_key: str = "title", sep: str = "\t") -> tuple[list[tuple[str, str]], int]:
    """(image path, caption) pairs from a CSV/TSV with a header row; relative paths are relative to the CSV's folder.

    Returns (rows, number of rows without an image path or caption). ValueError if a column is missing.
    """
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(f"csv: {csv_path} not found")
    base = os.path.dirname(os.path.abspath(csv_path))
    rows: list[tuple[str, str]] = []
    empty = 0
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=sep)
        fields = reader.fieldnames or []
        for name, key in (("img_key", img_key), ("caption_key", caption_key)):
            if key not in fields:
                raise ValueError(f"{name}: column {key!r} not in {csv_path} (columns: {fields}; separator {sep!r}, use --sep for another)")
        for r in reader:
            p, c = (r.get(img_key) or "").strip(), (r.get(caption_key) or "").strip()
            if not p or not c:
                empty += 1
                continue
            rows.append((p if os.path.isabs(p) else os.path.join(base, p), c))
    return rows, empty


def write_from_csv(csv_path: str, out_dir: str, *, img_key: str = "filepath", caption_key: str = "title", sep: str = "\t",
                   samples_per_shard: int = 1000, progress: bool = True) -> dict[str, Any]:
    """Shards + sizes.json from a CSV/TSV of image paths and captions (open_clip's --csv-img-key/--csv-caption-key
    defaults). Returns a summary dict (shards spec, counts, skipped files)."""
    rows, empty = csv_rows(csv_path, img_key=img_key, caption_key=caption_key, sep=sep)
    if not rows:
        raise ValueError(f"csv: no rows with both {img_key!r} and {caption_key!r} in {csv_path}")
    it = ((f"{i:09d}", p, c, None) for i, (p, c) in enumerate(rows))
    summary = _write_samples(it, out_dir, samples_per_shard, len(rows), "from-csv", progress)
    summary["rows_without_image_or_caption"] = empty
    return summary


def folder_items(root: str) -> tuple[list[str], list[tuple[str, int]]]:
    """ImageFolder layout: root/<class name>/<image>. Returns (sorted class names, [(path, class index)])."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"root: {root} is not a directory")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if not classes:
        raise ValueError(f"root: no class folders in {root} (expected root/<class name>/<images>)")
    items = []
    for ci, c in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(os.path.join(root, c))):
            for fn in sorted(files):
                if fn.lower().endswith(IMAGE_FILE_EXTS):
                    items.append((os.path.join(dirpath, fn), ci))
    if not items:
        raise ValueError(f"root: no image files ({', '.join(IMAGE_FILE_EXTS)}) under {root}")
    return classes, items


def _class_phrase(folder_name: str) -> str:
    return folder_name.replace("_", " ").strip()


def write_from_folder(root: str, out_dir: str, *, samples_per_shard: int = 1000, templates: Iterable[str] = DEFAULT_FOLDER_TEMPLATES,
                      progress: bool = True) -> dict[str, Any]:
    """Shards + sizes.json + classnames.txt + templates.txt from an ImageFolder (root/<class>/<image>).

    Class names are the folder names with '_' as spaces, labels their sorted index; each caption is a template
    filled with the class name, picked by the sample's index (so the output is reproducible).
    """
    templates = list(templates)
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"templates: expected templates containing '{{}}', got {templates}")
    classes, items = folder_items(root)
    names = [_class_phrase(c) for c in classes]

    def rows() -> Iterator[tuple[str, str, str, int]]:
        for i, (path, ci) in enumerate(items):
            yield f"{i:09d}", path, templates[i % len(templates)].format(names[ci]), ci

    summary = _write_samples(rows(), out_dir, samples_per_shard, len(items), "from-folder", progress)
    for fname, lines in (("classnames.txt", names), ("templates.txt", templates)):
        with open(os.path.join(summary["out_dir"], fname), "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    summary["classnames"] = names
    return summary
