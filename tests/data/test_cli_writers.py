"""`pyprotoclip data ...` commands and the CSV / ImageFolder converters, round-tripped through the loader."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pyprotoclip.cli import main
from pyprotoclip.data import DataConfig, build_loader, read_zeroshot_files
from tests.data.helpers import preprocess, tokenize


def run(*args: str):
    return CliRunner().invoke(main, ["data", *args], catch_exceptions=False)


def save_image(path, seed: int, fmt: str | None = None) -> np.ndarray:
    arr = np.full((6, 9, 3), seed * 20 % 256, dtype=np.uint8)
    arr[0, 0] = (seed, 2 * seed, 3 * seed)
    Image.fromarray(arr).save(path, format=fmt)
    return arr


@pytest.mark.parametrize("sub", [[], ["synthetic"], ["from-csv"], ["from-folder"]])
def test_help(sub):
    r = run(*sub, "--help")
    assert r.exit_code == 0 and "Usage" in r.output


def test_synthetic_command(tmp_path):
    out = tmp_path / "syn"
    r = run("synthetic", "--out", str(out), "--num-samples", "30", "--samples-per-shard", "10", "--num-val", "5",
            "--num-ood", "5", "--image-size", "16", "--processes", "1", "--quiet")
    assert r.exit_code == 0, r.output
    assert "wrote 40 samples" in r.output and "{00000..00002}.tar" in r.output
    info = json.load(open(out / "info.json"))
    assert info["num_train"] == 30 and info["image_size"] == 16


def test_synthetic_command_errors(tmp_path):
    r = CliRunner().invoke(main, ["data", "synthetic", "--out", str(tmp_path), "--num-samples", "0"])
    assert r.exit_code == 2 and "--num-samples" in r.output
    (tmp_path / "f.txt").write_text("x")
    r = CliRunner().invoke(main, ["data", "synthetic", "--out", str(tmp_path), "--num-samples", "5"])
    assert r.exit_code == 1 and "not empty" in r.output


def test_from_csv_round_trip(tmp_path):
    (tmp_path / "imgs").mkdir()
    arrays = {}
    lines = ["filepath\ttitle"]
    for i in range(5):
        fmt, ext = (("PNG", "png") if i % 2 else ("BMP", "bmp"))
        name = f"imgs/{i}.{ext}"
        arrays[i] = save_image(tmp_path / name, i, fmt)
        lines.append(f"{name}\tcaption number {i}")
    lines.append("imgs/missing.png\tno such file")
    lines.append("\tno path")
    (tmp_path / "data.tsv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "shards"
    r = run("from-csv", "--csv", str(tmp_path / "data.tsv"), "--out", str(out), "--samples-per-shard", "2", "--keep-order", "--json",
            "--quiet")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["num_samples"] == 5 and summary["num_shards"] == 3 and len(summary["skipped"]) == 1
    assert summary["rows_without_image_or_caption"] == 1
    assert json.load(open(out / "sizes.json")) == {"00000.tar": 2, "00001.tar": 2, "00002.tar": 1}
    loader = build_loader(DataConfig(summary["shards"], batch_size=10, workers=0, drop_last=False), preprocess=lambda im: preprocess(im),
                          tokenize=tokenize, is_train=False)
    (b,) = list(loader)
    assert b["caption"] == [f"caption number {i}" for i in range(5)] and b["label"].tolist() == [-1] * 5
    # PNGs are stored as they are (lossless): the pixels come back exactly
    from pyprotoclip.data.pipeline import expand_shards, iter_tar_members

    members = dict(iter_tar_members(open(expand_shards(summary["shards"])[0], "rb")))
    assert set(members) == {"000000000.jpg", "000000000.txt", "000000001.png", "000000001.txt"}
    import io

    assert np.array_equal(np.asarray(Image.open(io.BytesIO(members["000000001.png"]))), arrays[1])


def test_from_csv_errors(tmp_path):
    (tmp_path / "a.csv").write_text("path,text\nx.png,hello\n")
    r = CliRunner().invoke(main, ["data", "from-csv", "--csv", str(tmp_path / "a.csv"), "--out", str(tmp_path / "o"), "--sep", ","])
    assert r.exit_code == 1 and "--img-key: column 'filepath' not in" in r.output
    r = CliRunner().invoke(main, ["data", "from-csv", "--csv", str(tmp_path / "a.csv"), "--out", str(tmp_path / "o"), "--sep", ",",
                                  "--img-key", "path", "--caption-key", "text"])
    assert r.exit_code == 1 and "no sample could be written" in r.output
    r = CliRunner().invoke(main, ["data", "from-csv", "--csv", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "does not exist" in r.output
    r = CliRunner().invoke(main, ["data", "from-csv", "--csv", str(tmp_path / "a.csv"), "--out", str(tmp_path / "o"), "--sep", ";;"])
    assert r.exit_code == 2 and "--sep" in r.output


def test_from_folder_round_trip(tmp_path):
    root = tmp_path / "root"
    for c, n in (("golden_retriever", 3), ("cat", 2)):
        (root / c).mkdir(parents=True)
        for i in range(n):
            save_image(root / c / f"{i}.jpg", i, "JPEG")
    (root / "cat" / "notes.txt").write_text("not an image")
    out = tmp_path / "shards"
    r = run("from-folder", "--root", str(root), "--out", str(out), "--keep-order", "--quiet")
    assert r.exit_code == 0, r.output
    assert "wrote 5 samples in 1 shard(s)" in r.output and "order: as listed" in r.output
    names, templates = read_zeroshot_files(str(out / "00000.tar"))
    assert names == ["cat", "golden retriever"] and "a photo of a {}." in templates
    (b,) = list(build_loader(DataConfig(str(out / "00000.tar"), batch_size=8, workers=0, drop_last=False),
                             preprocess=preprocess, tokenize=tokenize, is_train=False))
    assert b["label"].tolist() == [0, 0, 1, 1, 1]
    for cap, lab in zip(b["caption"], b["label"].tolist()):
        assert names[lab] in cap


def test_from_folder_errors(tmp_path):
    r = CliRunner().invoke(main, ["data", "from-folder", "--root", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "does not exist" in r.output
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(main, ["data", "from-folder", "--root", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "no class folders" in r.output
    (tmp_path / "empty" / "a").mkdir()
    r = CliRunner().invoke(main, ["data", "from-folder", "--root", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "no image files" in r.output
