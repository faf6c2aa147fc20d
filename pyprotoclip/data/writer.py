"""Writing webdataset shards: a shard writer with reproducible tar headers, and the CSV / ImageFolder converters."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shlex
import sys
import tarfile
import time
from typing import Any, Callable, Iterable

import numpy as np
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
    """rows: (key, image path, caption, class index or None, ...); ``extra(row)`` gives more members for a sample.
    Unreadable images are skipped and reported."""
    prog = _Progress(label, total, progress)
    bad: list[str] = []
    with ShardWriter(out_dir, samples_per_shard) as w:
        for row in rows:
            key, path, caption, cls = row[:4]
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


def _order(n: int, seed: int | None) -> list[int]:
    """The order samples are written in: input order when seed is None, else a permutation of range(n) from numpy's
    PCG64 seeded with ``seed`` (the same seed gives the same order on every platform and numpy version)."""
    if seed is None:
        return list(range(n))
    return np.random.default_rng(seed).permutation(n).tolist()


def _few(names: Iterable[str], n: int = 5) -> str:
    names = list(names)
    more = f", ... ({len(names)} in all)" if len(names) > n else ""
    return ", ".join(repr(x) for x in names[:n]) + more


def read_names_file(path: str, what: str = "classnames") -> list[str]:
    """Non-empty stripped lines of a UTF-8 file (a leading BOM dropped), one class name per line. ValueError if it is
    empty or repeats a name."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            names = [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what}: {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    if not names:
        raise ValueError(f"{what}: {path} has no names (expected one class name per line)")
    seen: set[str] = set()
    dups = [x for x in names if x in seen or seen.add(x)]
    if dups:
        raise ValueError(f"{what}: {path} lists {_few(dict.fromkeys(dups))} more than once (expected each class once)")
    return names


def _write_zeroshot_files(out_dir: str, classnames: list[str], templates: list[str]) -> None:
    for fname, lines in (("classnames.txt", classnames), ("templates.txt", templates)):
        with open(os.path.join(out_dir, fname), "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")


def _check_templates(templates: Iterable[str]) -> list[str]:
    templates = list(templates)
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"templates: expected templates containing '{{}}', got {templates}")
    return templates


_INT = re.compile(r"[+-]?[0-9]+")


def csv_records(csv_path: str, *, img_key: str = "filepath", caption_key: str = "title", label_key: str | None = None,
                sep: str = "\t") -> tuple[list[tuple[str, str, str | None, int]], int]:
    """(image path, caption, label value or None, line number) for each row of a CSV/TSV with a header row; relative
    paths are relative to the CSV's folder.

    Rows without an image path or caption are left out and counted: returns (records, that count). ValueError if a
    column is missing or, with ``label_key``, a kept row's label cell is empty (the message names the line).
    """
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(f"csv: {csv_path} not found")
    base = os.path.dirname(os.path.abspath(csv_path))
    records: list[tuple[str, str, str | None, int]] = []
    empty = 0
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter=sep)
        fields = reader.fieldnames or []
        for name, key in (("img_key", img_key), ("caption_key", caption_key), ("label_key", label_key)):
            if key is not None and key not in fields:
                raise ValueError(f"{name}: column {key!r} not in {csv_path} (columns: {fields}; separator {sep!r}, use --sep for another)")
        for r in reader:
            p, c = (r.get(img_key) or "").strip(), (r.get(caption_key) or "").strip()
            if not p or not c:
                empty += 1
                continue
            label = None
            if label_key is not None:
                label = (r.get(label_key) or "").strip()
                if not label:
                    raise ValueError(f"label_key: line {reader.line_num} of {csv_path}: column {label_key!r} is empty "
                                     "(expected a class name or an integer id)")
            records.append((p if os.path.isabs(p) else os.path.join(base, p), c, label, reader.line_num))
    return records, empty


def csv_rows(csv_path: str, *, img_key: str = "filepath", caption_key: str = "title", sep: str = "\t") -> tuple[list[tuple[str, str]], int]:
    """(image path, caption) pairs from a CSV/TSV with a header row; relative paths are relative to the CSV's folder.

    Returns (rows, number of rows without an image path or caption). ValueError if a column is missing.
    """
    records, empty = csv_records(csv_path, img_key=img_key, caption_key=caption_key, sep=sep)
    return [(p, c) for p, c, _, _ in records], empty


def csv_labels(values: list[tuple[str, int]], *, column: str, source: str,
               classnames: list[str] | None = None) -> tuple[list[int], list[str], str]:
    """Class indices for the label cells ``values`` ((cell, line number) pairs) of ``column`` in ``source``.

    If every cell is an integer, the cells are ids and ``classnames`` (required) gives their names: line i of the
    file is the name of id i. Otherwise the cells are class names: their index in ``classnames`` when given (every
    name must be in it; it may list classes with no row), else in the sorted list of the distinct names.
    Returns (indices, class names, "ids" or "names"). ValueError naming the line for a bad cell.
    """
    if all(_INT.fullmatch(v) for v, _ in values):
        if classnames is None:
            raise ValueError(f"classnames: column {column!r} of {source} holds integer ids; give their names with a "
                             "classnames file (line i = the name of id i)")
        out = []
        for v, line in values:
            i = int(v)
            if not 0 <= i < len(classnames):
                raise ValueError(f"label_key: line {line} of {source}: id {v} in column {column!r} is outside 0..{len(classnames) - 1} "
                                 f"(the classnames file has {len(classnames)} names)")
            out.append(i)
        return out, list(classnames), "ids"
    names = list(classnames) if classnames is not None else sorted({v for v, _ in values})
    index = {n: i for i, n in enumerate(names)}
    out = []
    for v, line in values:
        if v not in index:
            raise ValueError(f"label_key: line {line} of {source}: class {v!r} in column {column!r} is not in the classnames file")
        out.append(index[v])
    return out, names, "names"


def write_from_csv(csv_path: str, out_dir: str, *, img_key: str = "filepath", caption_key: str = "title", sep: str = "\t",
                   label_key: str | None = None, classnames_file: str | None = None,
                   templates: Iterable[str] = DEFAULT_FOLDER_TEMPLATES, samples_per_shard: int = 1000, seed: int | None = 0,
                   progress: bool = True) -> dict[str, Any]:
    """Shards + sizes.json from a CSV/TSV of image paths and captions (open_clip's --csv-img-key/--csv-caption-key
    defaults). Returns a summary dict (shards spec, counts, skipped files).

    With ``label_key``, each sample also gets ``<key>.cls`` from that column (see :func:`csv_labels` for ids vs
    names), and classnames.txt + templates.txt are written beside the shards. Samples are written in a random order
    drawn from ``seed`` (``None``: the CSV's order); the key of a sample is its index among the CSV's kept rows.
    """
    if classnames_file is not None and label_key is None:
        raise ValueError("classnames: only used with a label column (label_key)")
    templates = _check_templates(templates)
    records, empty = csv_records(csv_path, img_key=img_key, caption_key=caption_key, label_key=label_key, sep=sep)
    if not records:
        raise ValueError(f"csv: no rows with both {img_key!r} and {caption_key!r} in {csv_path}")
    labels: list[int | None] = [None] * len(records)
    names, kind = None, None
    if label_key is not None:
        given = read_names_file(classnames_file) if classnames_file is not None else None
        labels, names, kind = csv_labels([(lab, line) for _, _, lab, line in records], column=label_key, source=csv_path,
                                         classnames=given)
    it = ((f"{i:09d}", records[i][0], records[i][1], labels[i]) for i in _order(len(records), seed))
    summary = _write_samples(it, out_dir, samples_per_shard, len(records), "from-csv", progress)
    summary["rows_without_image_or_caption"] = empty
    summary["order"] = "input" if seed is None else f"seed {seed}"
    if names is not None:
        _write_zeroshot_files(summary["out_dir"], names, templates)
        summary["labels"] = kind
        summary["classnames"] = names
        used = set(labels)
        summary["classes_without_images"] = [n for i, n in enumerate(names) if i not in used]
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


def folder_class_order(folders: list[str], classnames_file: str, root: str) -> tuple[list[int], list[str]]:
    """For each class folder, its index in the classnames file, and the file's names ('_' as spaces). A line names a
    folder as it is or with spaces for '_' ("golden_retriever" or "golden retriever"); lines with no folder are
    classes without images (they keep their index). ValueError naming the folders with no line."""
    lines = read_names_file(classnames_file)
    pos = {_class_phrase(x): i for i, x in enumerate(lines)}
    if len(pos) != len(lines):
        raise ValueError(f"classnames: {classnames_file} lists a class twice (once with '_', once with spaces)")
    missing = [c for c in folders if _class_phrase(c) not in pos]
    if missing:
        raise ValueError(f"classnames: folder(s) under {root} with no line in {classnames_file}: {_few(missing)}")
    return [pos[_class_phrase(c)] for c in folders], [_class_phrase(x) for x in lines]


def caption_file_lines(image_path: str) -> list[str] | None:
    """The non-empty stripped lines of the caption file beside an image (``img.jpg`` -> ``img.txt``, img2dataset's
    convention), or None when there is none; a leading UTF-8 BOM is dropped. ValueError if it is not UTF-8 text."""
    path = os.path.splitext(image_path)[0] + ".txt"
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8-sig") as f:
            return [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError as exc:
        raise ValueError(f"caption file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); convert it to UTF-8, "
                         f"e.g. iconv -f latin1 -t utf-8 {shlex.quote(path)} -o {shlex.quote(path + '.utf8')}") from exc


def write_from_folder(root: str, out_dir: str, *, samples_per_shard: int = 1000, templates: Iterable[str] = DEFAULT_FOLDER_TEMPLATES,
                      classnames_file: str | None = None, seed: int | None = 0, progress: bool = True) -> dict[str, Any]:
    """Shards + sizes.json + classnames.txt + templates.txt from an ImageFolder (root/<class>/<image>).

    Class names are the folder names with '_' as spaces. Labels are the index of the folder name in sorted
    (alphabetical, code-point) order, or its line in ``classnames_file`` when given (which must name every folder and
    may name classes without images: they keep their line as label; these and empty class folders are listed in
    ``summary["classes_without_images"]``; images directly under ``root`` have no class and are left out, counted in
    ``summary["images_at_root"]``);
    classnames.txt lists the names in label order. An image's caption is the first non-empty line of
    its caption file (``img.jpg`` + ``img.txt``) when it has one, all its lines kept in ``<key>.json`` as
    {"captions": [...]} when there are several; otherwise a template filled with the class name, picked by the
    image's index. Samples are written in a random order drawn from ``seed`` (``None``: class by class, as listed);
    the key of a sample is its index in the sorted listing. The same inputs and seed give the same bytes.
    """
    templates = _check_templates(templates)
    folders, items = folder_items(root)
    names = [_class_phrase(c) for c in folders]
    without: list[str] = []
    if classnames_file is not None:
        order, ordered = folder_class_order(folders, classnames_file, root)
        for ci, li in enumerate(order):
            ordered[li] = names[ci]
        names = ordered
        items = [(p, order[ci]) for p, ci in items]
    with_images = {ci for _, ci in items}
    without = [names[li] for li in range(len(names)) if li not in with_images]  # an empty folder, or a name in the file
    at_root = [f for f in os.listdir(root) if f.lower().endswith(IMAGE_FILE_EXTS) and os.path.isfile(os.path.join(root, f))]
    rows: list[tuple[str, str, str, int, dict[str, Any]]] = []
    own = empty_files = 0
    for i, (path, ci) in enumerate(items):
        lines = caption_file_lines(path)
        extra: dict[str, Any] = {}
        if lines:
            own += 1
            caption = lines[0]
            if len(lines) > 1:
                extra["json"] = json.dumps({"captions": lines}, ensure_ascii=False)
        else:
            empty_files += lines is not None
            caption = templates[i % len(templates)].format(names[ci])
        rows.append((f"{i:09d}", path, caption, ci, extra))

    it = (rows[j] for j in _order(len(rows), seed))
    summary = _write_samples(it, out_dir, samples_per_shard, len(rows), "from-folder", progress, extra=lambda row: row[4])
    _write_zeroshot_files(summary["out_dir"], names, templates)
    summary["classnames"] = names
    summary["classes_without_images"] = without
    summary["images_at_root"] = len(at_root)
    summary["own_captions"] = own
    summary["empty_caption_files"] = empty_files
    summary["order"] = "input" if seed is None else f"seed {seed}"
    return summary
