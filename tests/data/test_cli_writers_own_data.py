"""`data from-csv --label-key`, `data from-folder` caption files and `--classnames`, and the seeded sample order."""

from __future__ import annotations

import hashlib
import json
import tarfile

import numpy as np
from click.testing import CliRunner
from PIL import Image

from pyprotoclip.cli import main
from pyprotoclip.data import DataConfig, build_loader, read_zeroshot_files
from tests.data.helpers import preprocess, tokenize


def run(*args: str):
    return CliRunner().invoke(main, ["data", *args])


def save_image(path, seed: int) -> None:
    arr = np.full((4, 5, 3), seed * 7 % 256, dtype=np.uint8)
    Image.fromarray(arr).save(path, format="PNG")


def members(shard) -> dict[str, bytes]:
    with tarfile.open(shard) as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers()}


def samples(out) -> list[list[dict[str, str]]]:
    """Per shard (in order), the samples' text members: [{"key", "txt", "cls", "json"?}]."""
    shards = sorted(json.loads((out / "sizes.json").read_text()))
    result = []
    for name in shards:
        by_key: dict[str, dict[str, str]] = {}
        for member, data in members(out / name).items():
            key, ext = member.split(".", 1)
            if ext in ("txt", "cls", "json"):
                by_key.setdefault(key, {"key": key})[ext] = data.decode()
        result.append(list(by_key.values()))
    return result


def one_line_error(r, code: int = 1) -> str:
    assert r.exit_code == code, r.output
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert len(lines) == (1 if code == 1 else 3), r.output  # usage errors: Usage + Try + Error
    return lines[-1]


def make_csv(tmp_path, labels: list[str], header: str = "filepath\ttitle\tlabel") -> str:
    (tmp_path / "imgs").mkdir(exist_ok=True)
    lines = [header]
    for i, lab in enumerate(labels):
        save_image(tmp_path / "imgs" / f"{i}.png", i)
        lines.append(f"imgs/{i}.png\tcaption {i}\t{lab}")
    (tmp_path / "data.tsv").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "data.tsv")


def loader_batch(spec: str) -> dict:
    (b,) = list(build_loader(DataConfig(spec, batch_size=100, workers=0, drop_last=False), preprocess=preprocess,
                             tokenize=tokenize, is_train=False))
    return b


def test_from_csv_label_names_sorted(tmp_path):
    labels = ["dog", "cat", "bird", "cat", "dog", "dog"]
    csv_path = make_csv(tmp_path, labels)
    out = tmp_path / "shards"
    r = run("from-csv", "--csv", csv_path, "--out", str(out), "--label-key", "label", "--quiet")
    assert r.exit_code == 0, r.output
    assert "labels (class names): 3 classes" in r.output
    names, templates = read_zeroshot_files(str(out / "00000.tar"))
    assert names == ["bird", "cat", "dog"] and "a photo of a {}." in templates
    b = loader_batch(str(out / "00000.tar"))
    got = {cap: lab for cap, lab in zip(b["caption"], b["label"].tolist())}
    assert got == {f"caption {i}": names.index(lab) for i, lab in enumerate(labels)}


def test_from_csv_label_names_with_classnames_order(tmp_path):
    csv_path = make_csv(tmp_path, ["dog", "cat", "dog"])
    (tmp_path / "names.txt").write_text("dog\nfish\ncat\n")  # may list a class with no row
    out = tmp_path / "shards"
    r = run("from-csv", "--csv", csv_path, "--out", str(out), "--label-key", "label", "--classnames", str(tmp_path / "names.txt"),
            "--keep-order", "--quiet")
    assert r.exit_code == 0, r.output
    assert (out / "classnames.txt").read_text() == "dog\nfish\ncat\n"
    assert [s["cls"] for s in samples(out)[0]] == ["0", "2", "0"]
    (tmp_path / "names.txt").write_text("dog\nfish\n")
    msg = one_line_error(run("from-csv", "--csv", csv_path, "--out", str(tmp_path / "o2"), "--label-key", "label",
                             "--classnames", str(tmp_path / "names.txt")))
    assert "--label-key: line 3 of" in msg and "class 'cat' in column 'label' is not in the classnames file" in msg


def test_from_csv_label_ids(tmp_path):
    csv_path = make_csv(tmp_path, ["2", "0", "1", "2"])
    (tmp_path / "names.txt").write_text("apple\nbanana\ncherry\n")
    (tmp_path / "tpl.txt").write_text("a fruit: {}.\n")
    out = tmp_path / "shards"
    r = run("from-csv", "--csv", csv_path, "--out", str(out), "--label-key", "label", "--classnames", str(tmp_path / "names.txt"),
            "--templates", str(tmp_path / "tpl.txt"), "--keep-order", "--json", "--quiet")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    assert summary["labels"] == "ids" and summary["classnames"] == ["apple", "banana", "cherry"]
    assert read_zeroshot_files(str(out / "00000.tar")) == (["apple", "banana", "cherry"], ["a fruit: {}."])
    assert [s["cls"] for s in samples(out)[0]] == ["2", "0", "1", "2"]
    # ids without names: the shards would be unusable for zero-shot
    msg = one_line_error(run("from-csv", "--csv", csv_path, "--out", str(tmp_path / "o2"), "--label-key", "label"))
    assert msg.startswith("Error: --classnames:") and "integer ids" in msg
    (tmp_path / "names.txt").write_text("apple\nbanana\n")
    msg = one_line_error(run("from-csv", "--csv", csv_path, "--out", str(tmp_path / "o3"), "--label-key", "label",
                             "--classnames", str(tmp_path / "names.txt")))
    assert "--label-key: line 2 of" in msg and "id 2 in column 'label' is outside 0..1" in msg


def test_from_csv_mixed_labels_are_names(tmp_path):
    csv_path = make_csv(tmp_path, ["7", "cat", "7"])
    out = tmp_path / "shards"
    r = run("from-csv", "--csv", csv_path, "--out", str(out), "--label-key", "label", "--keep-order", "--quiet")
    assert r.exit_code == 0, r.output
    assert (out / "classnames.txt").read_text() == "7\ncat\n"
    assert [s["cls"] for s in samples(out)[0]] == ["0", "1", "0"]


def test_from_csv_label_errors(tmp_path):
    csv_path = make_csv(tmp_path, ["dog", "", "cat"])
    msg = one_line_error(run("from-csv", "--csv", csv_path, "--out", str(tmp_path / "o"), "--label-key", "label"))
    assert "--label-key: line 3 of" in msg and "column 'label' is empty" in msg
    msg = one_line_error(run("from-csv", "--csv", csv_path, "--out", str(tmp_path / "o"), "--label-key", "class"))
    assert "--label-key: column 'class' not in" in msg
    (tmp_path / "names.txt").write_text("dog\ncat\ndog\n")
    msg = one_line_error(run("from-csv", "--csv", csv_path, "--out", str(tmp_path / "o"), "--classnames", str(tmp_path / "names.txt")), 2)
    assert "--classnames: only used with --label-key" in msg
    csv_path = make_csv(tmp_path, ["dog", "cat", "cat"])
    msg = one_line_error(run("from-csv", "--csv", csv_path, "--out", str(tmp_path / "o"), "--label-key", "label",
                             "--classnames", str(tmp_path / "names.txt")))
    assert "--classnames:" in msg and "'dog' more than once" in msg
    assert not (tmp_path / "o").exists()  # label errors come before anything is written


def make_folder(root, classes: dict[str, int]) -> None:
    k = 0
    for c, n in classes.items():
        (root / c).mkdir(parents=True)
        for i in range(n):
            save_image(root / c / f"{i}.png", k)
            k += 1


def test_from_folder_caption_files(tmp_path):
    root = tmp_path / "root"
    make_folder(root, {"cat": 2, "golden_retriever": 3})
    (root / "cat" / "0.txt").write_text("  a cat asleep on a red sofa \n")
    (root / "golden_retriever" / "1.txt").write_text("\na dog in the snow\na golden retriever running\n\n")
    (root / "golden_retriever" / "2.txt").write_text("\n  \n")  # empty: a template caption
    (root / "cat" / "notes.txt").write_text("no image of this name")
    out = tmp_path / "shards"
    r = run("from-folder", "--root", str(root), "--out", str(out), "--keep-order", "--quiet")
    assert r.exit_code == 0, r.output
    assert "captions: 2 of 5 image(s) had their own caption file, the others a template (1 caption file(s) were empty)" in r.output
    got = samples(out)[0]
    assert [s["txt"] for s in got] == ["a cat asleep on a red sofa", "a picture of a cat.", "an image of a golden retriever.",
                                       "a dog in the snow", "a photo of a golden retriever."]
    assert [s["cls"] for s in got] == ["0", "0", "1", "1", "1"]
    assert json.loads(got[3]["json"]) == {"captions": ["a dog in the snow", "a golden retriever running"]}
    assert ["json" in s for s in got] == [False, False, False, True, False]
    b = loader_batch(str(out / "00000.tar"))
    assert b["caption"][0] == "a cat asleep on a red sofa" and b["label"].tolist() == [0, 0, 1, 1, 1]
    r = run("from-folder", "--root", str(root), "--out", str(tmp_path / "o2"), "--json", "--quiet")
    assert json.loads(r.output)["own_captions"] == 2
    (root / "cat" / "1.txt").write_bytes(b"\xff\xfe bad")
    msg = one_line_error(run("from-folder", "--root", str(root), "--out", str(tmp_path / "o3")))
    assert msg.startswith("Error: caption file ") and "1.txt is not UTF-8 text" in msg
    assert "iconv -f latin1 -t utf-8" in msg and "--root" not in msg


def test_from_folder_caption_file_bom_dropped_and_one_class(tmp_path):
    root = tmp_path / "root"
    make_folder(root, {"cat": 1})
    (root / "cat" / "0.txt").write_bytes("\ufeffa cat on a mat\n".encode("utf-8"))
    out = tmp_path / "shards"
    r = run("from-folder", "--root", str(root), "--out", str(out), "--quiet")
    assert r.exit_code == 0, r.output
    assert [s["txt"] for s in samples(out)[0]] == ["a cat on a mat"]
    assert "labels: 1 class;" in r.output and "1 classes" not in r.output


def test_from_folder_classnames(tmp_path):
    root = tmp_path / "root"
    make_folder(root, {"cat": 1, "dog": 1, "golden_retriever": 1})
    (tmp_path / "names.txt").write_text("golden retriever\ndog\ncat\n")
    out = tmp_path / "shards"
    r = run("from-folder", "--root", str(root), "--out", str(out), "--classnames", str(tmp_path / "names.txt"), "--keep-order", "--quiet")
    assert r.exit_code == 0, r.output
    assert (out / "classnames.txt").read_text() == "golden retriever\ndog\ncat\n"
    got = samples(out)[0]
    assert [(s["cls"], s["txt"]) for s in got] == [("2", "a photo of a cat."), ("1", "a picture of a dog."),
                                                   ("0", "an image of a golden retriever.")]
    # default: alphabetical
    r = run("from-folder", "--root", str(root), "--out", str(tmp_path / "o2"), "--quiet")
    assert (tmp_path / "o2" / "classnames.txt").read_text() == "cat\ndog\ngolden retriever\n"
    (tmp_path / "bad.txt").write_text("golden_retriever\nhorse\ncat\nzebra\n")
    msg = one_line_error(run("from-folder", "--root", str(root), "--out", str(tmp_path / "o3"), "--classnames", str(tmp_path / "bad.txt")))
    assert msg.startswith("Error: --classnames: folder(s) under") and "with no line in" in msg and "'dog'" in msg
    assert "horse" not in msg  # names without a folder are allowed; only the folder without a line is an error


def test_from_folder_classnames_with_classes_without_images(tmp_path):
    # a validation folder missing a class gets the training set's label order
    root = tmp_path / "val"
    make_folder(root, {"green": 1, "red": 1})
    (tmp_path / "names.txt").write_bytes("\ufeffblue\ngreen\nred\n".encode("utf-8"))  # BOM dropped too
    out = tmp_path / "shards"
    r = run("from-folder", "--root", str(root), "--out", str(out), "--classnames", str(tmp_path / "names.txt"), "--keep-order", "--quiet")
    assert r.exit_code == 0, r.output
    assert (out / "classnames.txt").read_text() == "blue\ngreen\nred\n"
    assert [s["cls"] for s in samples(out)[0]] == ["1", "2"]
    assert "labels: 3 classes;" in r.output and "1 class without images: blue" in r.output
    r = run("from-folder", "--root", str(root), "--out", str(tmp_path / "o2"), "--classnames", str(tmp_path / "names.txt"), "--json", "--quiet")
    assert json.loads(r.output)["classes_without_images"] == ["blue"]


def test_from_folder_says_which_folders_are_empty_and_which_images_have_no_class(tmp_path):
    root = tmp_path / "photos"
    make_folder(root, {"cat": 2, "dog": 1})
    (root / "empty").mkdir()
    save_image(root / "stray.png", 7)  # directly under the root: no class
    out = tmp_path / "shards"
    r = run("from-folder", "--root", str(root), "--out", str(out), "--quiet")
    assert r.exit_code == 0, r.output
    assert (out / "classnames.txt").read_text() == "cat\ndog\nempty\n"
    assert "1 class without images: empty" in r.output
    assert "1 image directly under --root left out" in r.output
    assert sorted(s["cls"] for s in samples(out)[0]) == ["0", "0", "1"]


def test_help_says_how_labels_are_made():
    out = " ".join(run("from-folder", "--help").output.split())
    assert "alphabetical" in out and "--classnames" in out and "img.jpg + img.txt" in out and "--keep-order" in out
    out = " ".join(run("from-csv", "--help").output.split())
    assert "--label-key" in out and "integer they are ids" in out and "--seed" in out


def shard_digests(out) -> list[str]:
    return [hashlib.sha256((out / n).read_bytes()).hexdigest() for n in sorted(json.loads((out / "sizes.json").read_text()))]


def test_from_folder_shuffled_across_shards(tmp_path):
    root = tmp_path / "root"
    make_folder(root, {f"c{j}": 4 for j in range(10)})
    outs = {}
    for name, extra in (("a", []), ("b", []), ("seed1", ["--seed", "1"]), ("keep", ["--keep-order"])):
        outs[name] = tmp_path / name
        r = run("from-folder", "--root", str(root), "--out", str(outs[name]), "--samples-per-shard", "10", "--quiet", *extra)
        assert r.exit_code == 0, r.output
    kept = samples(outs["keep"])
    assert [int(s["cls"]) for s in kept[0]] == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    shuffled = samples(outs["a"])
    assert sorted(s["key"] for shard in shuffled for s in shard) == [f"{i:09d}" for i in range(40)]
    assert [s["key"] for shard in shuffled for s in shard] != [f"{i:09d}" for i in range(40)]
    assert min(len({s["cls"] for s in shard}) for shard in shuffled) >= 5  # class-sorted: 3 classes per shard
    # a sample keeps its caption and label whatever the order
    by_key = {s["key"]: s for shard in kept for s in shard}
    assert all(by_key[s["key"]] == s for shard in shuffled for s in shard)
    assert shard_digests(outs["a"]) == shard_digests(outs["b"])
    assert shard_digests(outs["a"]) != shard_digests(outs["seed1"])


def test_from_csv_shuffled_and_deterministic(tmp_path):
    csv_path = make_csv(tmp_path, [f"class{i // 5}" for i in range(20)])
    digests = []
    for name in ("a", "b"):
        r = run("from-csv", "--csv", csv_path, "--out", str(tmp_path / name), "--label-key", "label", "--samples-per-shard", "5", "--quiet")
        assert r.exit_code == 0, r.output
        assert "order: shuffled across shards (seed 0)" in r.output
        digests.append(shard_digests(tmp_path / name))
    assert digests[0] == digests[1]
    got = samples(tmp_path / "a")
    assert [s["txt"] for shard in got for s in shard] != [f"caption {i}" for i in range(20)]
    assert all(s["cls"] == str(int(s["key"]) // 5) and s["txt"] == f"caption {int(s['key'])}" for shard in got for s in shard)
    assert max(len({s["cls"] for s in shard}) for shard in got) > 1


def test_from_csv_bom_header_and_classes_without_rows(tmp_path):
    csv_path = make_csv(tmp_path, ["cat", "dog"])
    with open(csv_path, "rb") as f:
        raw = f.read()
    with open(csv_path, "wb") as f:
        f.write("\ufeff".encode("utf-8") + raw)  # an editor's BOM: the first column is still 'filepath'
    (tmp_path / "names.txt").write_text("bird\ncat\ndog\n")
    out = tmp_path / "shards"
    r = run("from-csv", "--csv", csv_path, "--out", str(out), "--label-key", "label", "--classnames", str(tmp_path / "names.txt"), "--quiet")
    assert r.exit_code == 0, r.output
    assert "1 class without images: bird" in r.output
