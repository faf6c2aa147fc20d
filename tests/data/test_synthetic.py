"""The synthetic dataset: layout, labels vs attributes, determinism, held-out OOD classes, argument errors."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from pyprotoclip.data import expand_shards, write_synthetic_dataset
from pyprotoclip.data.synthetic import COLOURS, OOD_KINDS, TRAIN_KINDS, render_sample


def shard_hashes(summary: dict) -> dict[str, str]:
    out = {}
    for split in ("train", "val", "ood"):
        for path in expand_shards(summary[f"{split}_shards"]):
            with open(path, "rb") as f:
                out[f"{split}/{os.path.basename(path)}"] = hashlib.sha256(f.read()).hexdigest()
    return out


def samples(path: str) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as t:
        for m in t.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = t.extractfile(m).read()
    return out


def test_layout_and_counts(synth):
    out = synth["out_dir"]
    for split, n, n_shards in (("train", 240, 6), ("val", 40, 1), ("ood", 40, 1)):
        shards = expand_shards(synth[f"{split}_shards"])
        assert len(shards) == n_shards
        sizes = json.load(open(os.path.join(out, split, "sizes.json")))
        assert sum(sizes.values()) == n and sorted(sizes) == sorted(os.path.basename(s) for s in shards)
        assert sum(len(samples(s)) for s in shards) == n
    info = json.load(open(os.path.join(out, "info.json")))
    assert info["seed"] == 3 and info["num_train"] == 240 and info["train_shards"] == synth["train_shards"]
    names = open(os.path.join(out, "classnames.txt")).read().split("\n")[:-1]
    assert names == synth["classnames"] and len(names) == len(TRAIN_KINDS) * len(COLOURS) == 20
    ood = open(os.path.join(out, "ood_classnames.txt")).read().split("\n")[:-1]
    assert len(ood) == 12 and not set(ood) & set(names)
    templates = open(os.path.join(out, "templates.txt")).read().split("\n")[:-1]
    assert templates and all("{}" in t for t in templates)
    for split in ("train", "val"):
        assert open(os.path.join(out, split, "classnames.txt")).read() == open(os.path.join(out, "classnames.txt")).read()


@pytest.mark.parametrize("split", ["train", "ood"])
def test_labels_attributes_and_captions_agree(synth, split):
    names = synth["classnames"] if split == "train" else synth["ood_classnames"]
    kinds = TRAIN_KINDS if split == "train" else OOD_KINDS
    seen = set()
    for path in expand_shards(synth[f"{split}_shards"]):
        for key, s in samples(path).items():
            assert set(s) == {"jpg", "txt", "cls", "json"}
            attrs = json.loads(s["json"])
            label = int(s["cls"])
            assert names[label] == attrs["class"] == f"{attrs['colour']} {attrs['kind']}"
            assert attrs["kind"] in kinds and attrs["split"] == split
            cap = s["txt"].decode()
            assert attrs["colour"] in cap and attrs["kind"] in cap
            im = Image.open(io.BytesIO(s["jpg"]))
            assert im.size == (32, 32) and im.mode == "RGB"
            seen.add(label)
    assert len(seen) >= 0.8 * len(names)  # classes are drawn uniformly


def test_object_colour_is_visible_in_the_pixels():
    # the pixels at the object's centre have the hue of its colour name (solid texture, no distractor on top)
    hues = {"red": 0, "yellow": 55, "green": 125, "blue": 225}
    checked = 0
    for i in range(200):
        im, _, _, a = render_sample(0, "train", i, 64)
        if a["texture"] != "solid" or a["kind"] in ("cross", "star") or a["size"] == "small":
            continue
        rgb = np.asarray(im, dtype=np.float64)[int(a["cy"] * 64), int(a["cx"] * 64)] / 255
        mx, mn = rgb.max(), rgb.min()
        if mx - mn < 0.2:  # an outline pixel or a very dark shade: no hue to speak of
            continue
        r, g, b = rgb
        h = (60 * ((g - b) / (mx - mn)) % 360) if mx == r else (60 * ((b - r) / (mx - mn)) + 120 if mx == g else 60 * ((r - g) / (mx - mn)) + 240)
        d = min(abs(h - hues[a["colour"]]), 360 - abs(h - hues[a["colour"]]))
        assert d < 25, (i, a, h)
        checked += 1
    assert checked > 15


def test_same_seed_same_bytes_different_seed_different(tmp_path, synth):
    kw = dict(seed=3, image_size=32, samples_per_shard=40, num_val=40, num_ood=40, progress=False)
    # a second write with 2 processes: the bytes do not depend on the process count
    again = write_synthetic_dataset(str(tmp_path / "a"), 240, processes=2, **kw)
    assert shard_hashes(again) == shard_hashes(synth)
    other = write_synthetic_dataset(str(tmp_path / "b"), 240, processes=1, **{**kw, "seed": 4})
    ha, hb = shard_hashes(synth), shard_hashes(other)
    assert all(ha[k] != hb[k] for k in ha)


def test_samples_do_not_depend_on_shard_size(tmp_path):
    a = write_synthetic_dataset(str(tmp_path / "a"), 30, samples_per_shard=7, num_val=0, num_ood=0, progress=False, processes=1, image_size=16)
    b = write_synthetic_dataset(str(tmp_path / "b"), 30, samples_per_shard=30, num_val=0, num_ood=0, progress=False, processes=1, image_size=16)
    sa = {k: v for p in expand_shards(a["train_shards"]) for k, v in samples(p).items()}
    sb = samples(expand_shards(b["train_shards"])[0])
    assert sa == sb and len(sa) == 30
    assert a["val_shards"] is None and not os.path.exists(os.path.join(a["out_dir"], "val"))


def test_render_sample_is_a_pure_function():
    a = render_sample(5, "val", 17, 32)
    b = render_sample(5, "val", 17, 32)
    assert a[1:] == b[1:] and np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    c = render_sample(5, "train", 17, 32)
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))


def test_rewrite_replaces_an_old_dataset(tmp_path):
    out = str(tmp_path / "d")
    write_synthetic_dataset(out, 20, samples_per_shard=5, num_val=0, num_ood=0, progress=False, processes=1, image_size=16)
    assert len(os.listdir(os.path.join(out, "train"))) == 4 + 3  # 4 shards, sizes.json, classnames, templates
    write_synthetic_dataset(out, 10, samples_per_shard=5, num_val=0, num_ood=0, progress=False, processes=1, image_size=16)
    assert sorted(f for f in os.listdir(os.path.join(out, "train")) if f.endswith(".tar")) == ["00000.tar", "00001.tar"]


def test_errors(tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "precious.txt").write_text("x")
    with pytest.raises(ValueError, match="out_dir: .* not empty"):
        write_synthetic_dataset(str(tmp_path / "other"), 10, progress=False)
    with pytest.raises(ValueError, match="num_samples"):
        write_synthetic_dataset(str(tmp_path / "x"), 0, progress=False)
    with pytest.raises(ValueError, match="image_size"):
        write_synthetic_dataset(str(tmp_path / "x"), 10, image_size=4, progress=False)
    with pytest.raises(ValueError, match="num_val"):
        write_synthetic_dataset(str(tmp_path / "x"), 10, num_val=-1, progress=False)
    with pytest.raises(ValueError, match="split"):
        render_sample(0, "test", 0)
