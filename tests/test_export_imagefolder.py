"""scripts/export_imagefolder.py: a fabricated Fashion-MNIST (real IDX .gz files) and scikit-learn's digits written
as image folders and read back through `--dataset imagefolder`'s loader: the same pixels and labels, balanced
subsets that depend only on the seed, and one-line errors that write nothing."""
from __future__ import annotations

import errno
import importlib.util
import os
import signal
import json
import subprocess
import sys
import time

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import fabricate
from clusterlab import results
from clusterlab.data import load, loader
from clusterlab.data.augment import EvalView
from clusterlab.errors import ConfigError
from clusterlab.eval.features import data_protocol
from conftest import ROOT, entry_module, script_env, snapshot

SPEC = importlib.util.spec_from_file_location("export_imagefolder", ROOT / "scripts" / "export_imagefolder.py")
export = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(export)


def read_back(root, split: str) -> tuple[torch.Tensor, torch.Tensor, list]:
    """(images (N, C, H, W) uint8, labels, file names) as the suite's image-folder loader serves them."""
    images = load("imagefolder", split, str(root))
    view = EvalView.of(images.image_size, images.image_size)  # 28 -> 28: PIL hands the image back unchanged
    batches = list(loader.sequential(images, torch.arange(len(images)), 64, view=view))
    return torch.cat([batch for batch, _ in batches]), images.labels, images.files


def positions_of(files: list) -> np.ndarray:
    return np.array([int(name.rsplit("/", 1)[1].removesuffix(".png")) for name in files])


@pytest.fixture
def fashion(tmp_path):
    """A 100 + 50 image Fashion-MNIST in IDX .gz files, and the arrays fabricate wrote into them."""
    fabricate.make_fashion_mnist(tmp_path / "idx", n_train=100, n_test=50)
    return tmp_path / "idx", fabricate.fashion_mnist_arrays(100, 50)


def test_whole_dataset_round_trip(tmp_path, fashion):
    source, arrays = fashion
    export.main(["--dataset", "fashion_mnist", "--data_path", str(source), "--out", str(tmp_path / "out")])
    for split in ("train", "test"):
        expected_images, expected_labels = arrays[split]
        images, labels, files = read_back(tmp_path / "out", split)
        order = positions_of(files)
        assert sorted(order.tolist()) == list(range(len(expected_labels)))  # every image, each once
        assert torch.equal(images, torch.from_numpy(expected_images[order]))
        assert torch.equal(labels, torch.from_numpy(expected_labels[order]))
        # the label fabricate wrote into the pixels agrees with the class folder the file is in
        assert np.array_equal(fabricate.decode_label(images.numpy()), labels.numpy())
    assert load("imagefolder", "train", str(tmp_path / "out")).class_names[0] == "0_T-shirt_top"


def test_per_class_subset_is_balanced_and_exact(tmp_path, fashion):
    source, arrays = fashion
    export.main(["--dataset", "fashion_mnist", "--data_path", str(source), "--out", str(tmp_path / "out"),
                 "--per_class", "4", "--seed", "3"])
    images, labels, files = read_back(tmp_path / "out", "train")
    assert np.bincount(labels.numpy(), minlength=10).tolist() == [4] * 10
    order = positions_of(files)
    assert len(set(order.tolist())) == 40
    assert torch.equal(images, torch.from_numpy(arrays["train"][0][order]))
    assert torch.equal(labels, torch.from_numpy(arrays["train"][1][order]))
    assert len(read_back(tmp_path / "out", "test")[1]) == 50  # the test split whole by default
    record = json.loads((tmp_path / "out" / "export.json").read_text())
    assert record["images"] == {"train": 40, "test": 50} and record["per_class_counts"]["train"] == [4] * 10


def test_count_spreads_the_remainder_and_depends_only_on_the_seed(tmp_path, fashion):
    source, _ = fashion

    def exported(name: str, seed: int, *extra: str) -> tuple[list, list]:
        export.main(["--dataset", "fashion_mnist", "--data_path", str(source), "--out", str(tmp_path / name),
                     "--count", "25", "--seed", str(seed), *extra])
        _, train_labels, train_files = read_back(tmp_path / name, "train")
        _, test_labels, _ = read_back(tmp_path / name, "test")
        assert np.bincount(train_labels.numpy(), minlength=10).tolist() == [3] * 5 + [2] * 5
        return positions_of(train_files).tolist(), test_labels.tolist()

    first, test_whole = exported("a", 0)
    again, _ = exported("b", 0)
    other, test_subset = exported("c", 1, "--subset_test", "true")
    assert first == again and first != other
    assert len(test_whole) == 50
    assert np.bincount(test_subset, minlength=10).tolist() == [3] * 5 + [2] * 5


def test_digits_round_trip(tmp_path):
    export.main(["--dataset", "digits", "--out", str(tmp_path / "digits"), "--per_class", "5"])
    digits = load("digits", "train")
    images, labels, files = read_back(tmp_path / "digits", "train")
    order = positions_of(files)
    assert images.shape == (50, 1, 8, 8)
    assert torch.equal(images, digits.images[order]) and torch.equal(labels, digits.labels[order])


def test_class_folder_names_sort_in_label_order():
    names = export.class_folder_names([f"c/{i}" for i in range(12)])
    assert names[:3] == ["00_c_0", "01_c_1", "02_c_2"] and sorted(names) == names


@pytest.mark.parametrize("extra, words", [
    (["--dataset", "mnist_typo"], ["--dataset 'mnist_typo'", "fashion_mnist", "digits"]),
    (["--dataset", "imagefolder"], ["--dataset 'imagefolder'", "choose one of"]),
    (["--dataset", "fashion_mnist", "--per_class", "20"],
     ["--per_class 20 asks for 20 images of class 'T-shirt/top', but the train split has only 10: give --per_class "
      "10 at most"]),
    # the largest --count, not a count per class
    (["--dataset", "fashion_mnist", "--count", "105"],
     ["--count 105 asks for 11 images of class 'T-shirt/top', but the train split has only 10: give --count 100 at "
      "most"]),
    (["--dataset", "fashion_mnist", "--count", "5"], ["--count 5", "10 classes"]),
    # more than a C long: a traceback from numpy's integers
    (["--dataset", "fashion_mnist", "--count", "1" + "0" * 20], ["10000000000000000000 images of class", "has only"]),
    (["--dataset", "fashion_mnist", "--count", "60", "--subset_test", "true"],
     ["--count 60 asks for 6 images of class 'T-shirt/top', but the test split has only 5: give --count 50 at most"]),
    (["--dataset", "fashion_mnist", "--per_class", "2", "--count", "30"], ["--per_class 2", "--count 30", "choose one"]),
    (["--dataset", "fashion_mnist", "--per_class", "0"], ["--per_class", "0"]),
    (["--dataset", "fashion_mnist", "--per_class", "2", "--seed", "-1"], ["--seed", "'-1'", "0 or more"]),
    # an unset shell variable: read as the current folder
    (["--dataset", "fashion_mnist", "--out", ""], ["--out", "'' is empty (give a path"]),
])
def test_bad_values_are_one_line_and_write_nothing(tmp_path, fashion, monkeypatch, capsys, extra, words):
    source, _ = fashion
    out = tmp_path / "out"
    message = one_line_error(monkeypatch, capsys, ["--data_path", str(source), "--out", str(out), *extra])
    assert all(word in message for word in words), message
    assert not out.exists()


def test_a_split_without_every_class_is_refused_before_writing(tmp_path, monkeypatch, capsys):
    """CIFAR-100 files whose test split lacks classes (50 images of 100 classes) were exported with empty class
    folders under val/, which `--dataset imagefolder` then refused: the export said it wrote them all."""
    fabricate.make_cifar100(tmp_path / "c100", n_train=300, n_test=50)
    labels = fabricate.cifar100_arrays(300, 50)
    assert len(set(labels["train"][1].tolist())) == 100 > len(set(labels["test"][1].tolist()))
    out = tmp_path / "out"
    message = one_line_error(monkeypatch, capsys, ["--dataset", "cifar100", "--data_path", str(tmp_path / "c100"),
                                                   "--out", str(out)])
    assert "the test split of cifar100 has no image of" in message and "every class in train/ and test/" in message
    assert not out.exists()


def test_missing_files_advise_download_which_the_script_takes(tmp_path, fashion, monkeypatch, capsys):
    """The loader's advice names --download; the script refused it as an unknown flag. With the files present it
    downloads nothing and exports them."""
    message = one_line_error(monkeypatch, capsys, ["--dataset", "cifar10", "--data_path", str(tmp_path / "none"),
                                                   "--out", str(tmp_path / "out")])
    assert "--download" in message
    source, _ = fashion
    export.main(["--dataset", "fashion_mnist", "--data_path", str(source), "--download", "--per_class", "1",
                 "--out", str(tmp_path / "out")])
    assert len(list((tmp_path / "out" / "train").rglob("*.png"))) == 10


def test_help_lists_the_flags_although_some_are_required(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["export_imagefolder.py"])
    with pytest.raises(SystemExit) as caught:
        export.cli(["--help"])
    out = capsys.readouterr().out
    assert caught.value.code == 0 and "--dataset DATASET" in out and "--per_class" in out


def test_an_output_path_that_is_a_dangling_link_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "link").symlink_to(tmp_path / "nowhere" / "deep")
    message = one_line_error(monkeypatch, capsys, ["--dataset", "digits", "--per_class", "2", "--out",
                                                   str(tmp_path / "link")])
    assert "cannot write" in message and "choose another path" in message and not (tmp_path / "nowhere").exists()


def test_a_non_empty_output_folder_is_refused(tmp_path, fashion, monkeypatch, capsys):
    source, _ = fashion
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = snapshot(out)
    message = one_line_error(monkeypatch, capsys, ["--dataset", "fashion_mnist", "--data_path", str(source),
                                                   "--out", str(out)])
    assert f"--out {str(out)!r}" in message and "not an empty folder" in message
    assert snapshot(out) == before


def test_an_export_cut_short_leaves_the_folder_empty_and_can_run_again(tmp_path, monkeypatch, capsys):
    """A full disk in the middle of the test split: no train/ that the loader would read as a smaller dataset, and
    the same command then writes the whole export."""
    from PIL import Image

    save, saved = Image.Image.save, []

    def fill_the_disk_at_the_120th(self, *args, **kwargs):
        if len(saved) == 119:
            raise OSError(errno.ENOSPC, "No space left on device", str(args[0]))
        saved.append(args[0])
        return save(self, *args, **kwargs)

    out, argv = tmp_path / "out", ["--dataset", "digits", "--per_class", "10", "--out", str(tmp_path / "out")]
    monkeypatch.setattr(Image.Image, "save", fill_the_disk_at_the_120th)
    message = one_line_error(monkeypatch, capsys, argv)
    assert "No space left on device" in message and "choose another --out" in message, message
    assert out.is_dir() and not any(out.iterdir())
    monkeypatch.setattr(Image.Image, "save", save)
    export.main(argv)
    assert sorted(path.name for path in out.iterdir()) == ["export.json", "test", "train"]
    assert len(read_back(out, "train")[1]) == 100 and len(read_back(out, "test")[1]) == 899


def test_an_export_stopped_by_term_leaves_the_folder_empty_and_a_killed_ones_leftovers_go(tmp_path, monkeypatch):
    """Slurm's TERM (a time limit, scancel) in the middle: the hidden folder goes too. An export killed outright
    leaves only its hidden folder, which does not block the next one."""
    from PIL import Image

    save, saved = Image.Image.save, []

    def terminated_at_the_50th(self, *args, **kwargs):
        if len(saved) == 49:
            os.kill(os.getpid(), signal.SIGTERM)
        saved.append(args[0])
        return save(self, *args, **kwargs)

    out, argv = tmp_path / "out", ["--dataset", "digits", "--per_class", "10", "--out", str(tmp_path / "out")]
    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(Image.Image, "save", terminated_at_the_50th)
    with pytest.raises(SystemExit) as stopped:
        export.main(argv)
    assert stopped.value.code == 128 + signal.SIGTERM and list(out.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == before  # the caller's handler given back
    monkeypatch.setattr(Image.Image, "save", save)
    (out / ".partial-killed" / "train").mkdir(parents=True)
    export.main(argv)
    assert sorted(path.name for path in out.iterdir()) == ["export.json", "test", "train"]


# The export script, its first image written into the hidden folder, writes on only once the file argv[1] exists.
HOLD_AFTER_FIRST_SAVE = """
import runpy, sys, time
from pathlib import Path
from PIL import Image
save, go, script = Image.Image.save, Path(sys.argv[1]), sys.argv[2]
def held(self, *args, **kwargs):
    save(self, *args, **kwargs)
    while not go.exists():
        time.sleep(0.05)
Image.Image.save = held
sys.argv = [script, *sys.argv[3:]]
runpy.run_path(script, run_name="__main__")
"""


def test_a_second_export_into_the_same_folder_is_refused_while_the_first_writes(tmp_path, monkeypatch, capsys):
    """The second export took the first's hidden folder for a killed export's and removed it: the first went on,
    said it wrote every image, and test/ lacked hundreds."""
    out, go = tmp_path / "out", tmp_path / "go"
    argv = ["--dataset", "digits", "--per_class", "3", "--out", str(out)]
    script = ROOT / "scripts" / "export_imagefolder.py"
    first = subprocess.Popen([sys.executable, "-c", HOLD_AFTER_FIRST_SAVE, str(go), str(script), *argv], cwd=ROOT,
                             env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not list(out.glob(".partial-*/*/*/*.png")) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        message = one_line_error(monkeypatch, capsys, argv)
        assert f"export folder {str(out)!r} is in use by pid {first.pid}" in message, message
        # (the lock of an export killed on another host looks like a live one's: the way out is named)
        assert f"choose another --out (an export killed on another host leaves its lock: remove " \
               f"{str(out / '.lock')!r} then)" in message
    finally:
        go.touch()
        stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    assert "wrote 30 training and 899 test images" in stdout
    assert len(read_back(out, "train")[1]) == 30 and len(read_back(out, "test")[1]) == 899
    assert sorted(path.name for path in out.iterdir()) == ["export.json", "test", "train"]  # the lock gone


def one_line_error(monkeypatch, capsys, argv: list) -> str:
    """Run the script's main as `python scripts/export_imagefolder.py` would; its one stderr line (exit status 2)."""
    monkeypatch.setattr(sys, "argv", ["export_imagefolder.py"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as caught:
        export.cli(argv)
    err = capsys.readouterr().err.splitlines()
    assert caught.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("export_imagefolder.py: error: ")
    return err[0]


@pytest.mark.slow  # the runs' records name the git commit: git runs
def test_two_subsets_of_one_dataset_never_share_a_table_row(tmp_path, fashion, capsys):
    """Pixel baselines of a 20- and a 40-image export, and of the same 20 images under another folder name: each
    record names its folder and split sizes, and collect_results.py gives each its own row (a row would otherwise
    average over the folders as if they were seeds)."""
    source, _ = fashion
    runs = tmp_path / "runs"
    for name, per_class in (("fm_20", 2), ("fm_40", 4), ("copy_of_fm_20", 2)):
        export.main(["--dataset", "fashion_mnist", "--data_path", str(source), "--out", str(tmp_path / name),
                     "--per_class", str(per_class)])
        common = ["--baseline", "pixels", "--dataset", "imagefolder", "--data_path", str(tmp_path / name),
                  "--output_dir", str(runs / name)]
        entry_module("eval_knn").main([*common, "--k", "5"])
        entry_module("eval_cluster").main([*common, "--plot", "false"])
    records = {Path(r["_file"]).parent.name: r for r in results.read_records(runs) if r["eval"] == "knn"}
    assert {key: records["fm_40"]["protocol"][key] for key in ("data", "train_images", "scored_images")} == \
        {"data": "fm_40", "train_images": 40, "scored_images": 50}
    assert records["fm_20"]["protocol"]["train_images"] == 20 and records["fm_20"]["dataset"] == "imagefolder"
    entry_module("eval_knn").main(["--baseline", "pixels", "--dataset", "digits", "--output_dir", str(runs / "digits"),
                                   "--k", "5"])
    entry_module("collect_results").main(["--root", str(runs), "--out", str(tmp_path / "tables"), "--plots", "false",
                                          "--curves", "false", "--published", "", "--combined",
                                          str(tmp_path / "study.md")])
    table = pd.read_csv(tmp_path / "tables" / "imagefolder.csv")
    assert len(table) == 6 and (table["n"] == 1).all()
    knn = table[table["eval"] == "knn"]
    knn = knn.set_index(knn["protocol"].str.extract(r"data=(\S+)", expand=False))
    assert sorted(knn.index) == ["copy_of_fm_20", "fm_20", "fm_40"]
    # the same 20 images give the same number under either name; the 40 another one
    assert knn.loc["fm_20", "top1_mean"] == knn.loc["copy_of_fm_20", "top1_mean"]
    assert knn.loc["fm_20", "top1_mean"] == pytest.approx(100 * records["fm_20"]["metrics"]["top1"])
    assert knn.loc["fm_40", "top1_mean"] == pytest.approx(100 * records["fm_40"]["metrics"]["top1"])
    # --combined: both datasets' tables, as collect_results.py writes each on its own, in one file
    combined = (tmp_path / "study.md").read_text()
    for dataset in ("digits", "imagefolder"):
        alone = (tmp_path / "tables" / f"{dataset}.md").read_text().removeprefix(f"# {dataset}\n\n")
        assert f"## {dataset}\n\n{alone}" in combined
    assert combined.index("## digits") < combined.index("## imagefolder")


def test_an_in_memory_dataset_adds_to_the_protocol_only_a_crop_other_than_the_default():
    digits = load("digits", "test")
    assert data_protocol(digits, digits, EvalView.of(8, 8), 8) == {}
    assert data_protocol(digits, digits, EvalView.of(8, 12), 8) == {}  # a resize does not apply to it
    assert data_protocol(digits, digits, EvalView.of(4), 8) == {"eval_crop": 4}


def test_the_largest_count_named_is_the_largest_every_class_can_give():
    """Against a search over every count, on classes of uneven sizes."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        sizes = rng.integers(1, 9, size=int(rng.integers(2, 6))).tolist()
        labels = np.repeat(np.arange(len(sizes)), sizes)
        fits = [count for count in range(len(sizes), len(labels) + 1)
                if all(w <= s for w, s in zip(export.per_class_quota(len(sizes), None, count), sizes))]
        names = [f"c{label}" for label in range(len(sizes))]
        export.refuse_beyond_a_class({"train": labels}, export.per_class_quota(len(sizes), None, max(fits)), names,
                                     None, max(fits))
        with pytest.raises(ConfigError, match=rf"give --count {max(fits)} at most$"):
            export.refuse_beyond_a_class({"train": labels}, export.per_class_quota(len(sizes), None, max(fits) + 1),
                                         names, None, max(fits) + 1)


def test_the_largest_count_named_fits_every_split_subset():
    """With --subset_test the limit was worked out from the first split found short: the count it named was
    refused in turn, by the other split."""
    train = np.repeat(np.arange(10), [11, *[10] * 8, 9])
    test = np.repeat(np.arange(10), [10] * 5 + [5, 15] + [10] * 3)
    names = [f"c{label}" for label in range(10)]
    with pytest.raises(ConfigError, match=r"^--count 100 asks for 10 images of class 'c9', but the train split has "
                                          r"only 9: give --count 55 at most$"):
        export.refuse_beyond_a_class({"train": train, "test": test}, export.per_class_quota(10, None, 100), names,
                                     None, 100)
    export.refuse_beyond_a_class({"train": train, "test": test}, export.per_class_quota(10, None, 55), names, None,
                                 55)
    with pytest.raises(ConfigError, match=r"give --per_class 5 at most$"):
        export.refuse_beyond_a_class({"train": train, "test": test}, [6] * 10, names, 6, None)
