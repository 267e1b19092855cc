"""Dataset readers and the registry on files fabricated in the real on-disk formats (tests/fabricate.py)."""
from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

import fabricate
from clusterlab.data import loader, registry
from clusterlab.data.augment import EvalView
from clusterlab.data.formats import read_idx
from clusterlab.errors import DataError
from conftest import require_installed
from dist_utils import run_distributed

FASHION_DIR = Path(registry.FASHION_MNIST_DIR)
FASHION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte")

# The IIC CIFAR-100 -> 20 table, which Self-Classifier v1 and EmbedUL type in by hand and which the real pickle's
# coarse_labels hold: the fabricated pickles use a different map on purpose.
IIC_COARSE = [4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11, 6, 11, 5, 10, 7, 6, 13, 15, 3, 15,
              0, 11, 1, 10, 12, 14, 16, 9, 11, 5, 5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4, 18,
              17, 10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13, 16, 19, 2, 4, 6, 19, 5, 5, 8,
              19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13]


def data_error(fn, *args, **kwargs) -> str:
    """Run fn, expect a DataError, check its message is one line, return it."""
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message, message
    return message


def check_tensors(ds, images: np.ndarray, labels: np.ndarray):
    assert ds.in_memory and ds.images.dtype == torch.uint8 and ds.labels.dtype == torch.int64
    assert tuple(ds.images.shape) == images.shape
    assert ds.images.is_contiguous()
    np.testing.assert_array_equal(ds.images.numpy(), images)
    np.testing.assert_array_equal(ds.labels.numpy(), labels)
    assert len(ds) == len(labels)


# ---- fabricated datasets, one folder per module --------------------------------------------------------------------

@pytest.fixture(scope="module")
def cifar10_root(tmp_path_factory):
    # 23 training images do not split evenly over the 5 batches: the concatenation order is checked too.
    return fabricate.make_cifar10(tmp_path_factory.mktemp("c10"), n_train=23, n_test=12, seed=1)


@pytest.fixture(scope="module")
def cifar100_root(tmp_path_factory):
    return fabricate.make_cifar100(tmp_path_factory.mktemp("c100"), n_train=120, n_test=40, seed=2)


@pytest.fixture(scope="module")
def stl10_root(tmp_path_factory):
    return fabricate.make_stl10(tmp_path_factory.mktemp("stl"), n_train=20, n_test=12, n_unlabeled=15, seed=3)


@pytest.fixture(scope="module")
def fashion_root(tmp_path_factory):
    return fabricate.make_fashion_mnist(tmp_path_factory.mktemp("fm"), n_train=60, n_test=30, seed=4)


# ---- CIFAR ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("split,n", [("train", 23), ("test", 12)])
def test_cifar10_reads_pickles(cifar10_root, split, n):
    images, labels = fabricate.cifar10_arrays(23, 12, seed=1)[split]
    ds = registry.load("cifar10", split, str(cifar10_root))
    check_tensors(ds, images, labels)
    assert (ds.name, ds.split, ds.num_classes, ds.channels, ds.image_size) == ("cifar10", split, 10, 3, 32)
    assert len(ds) == n and set(ds.labels.tolist()) == set(range(10))
    # Pairing and order survive the batch concatenation.
    np.testing.assert_array_equal(fabricate.decode_label(ds.images), ds.labels.numpy())
    np.testing.assert_array_equal(fabricate.decode_index(ds.images), np.arange(n))
    assert ds.class_names == fabricate.CIFAR10_CLASSES
    assert ds.mean == registry.CIFAR10_MEAN and ds.std == registry.CIFAR10_STD
    assert ds.superclass_labels is None


def test_cifar10_folder_given_directly(cifar10_root):
    ds = registry.load("cifar10", "test", str(Path(cifar10_root) / "cifar-10-batches-py"))
    assert len(ds) == 12


def test_cifar10_without_meta_numbers_classes(tmp_path):
    fabricate.make_cifar10(tmp_path, n_train=10, n_test=10)
    (tmp_path / "cifar-10-batches-py" / "batches.meta").unlink()
    assert registry.load("cifar10", "test", str(tmp_path)).class_names == [str(i) for i in range(10)]


def _pickle_labels(path: Path, key: str) -> np.ndarray:
    with open(path, "rb") as handle:
        return np.asarray(pickle.load(handle, encoding="latin1")[key])


@pytest.mark.parametrize("split,n", [("train", 120), ("test", 40)])
def test_cifar100_fine_labels_and_superclasses(cifar100_root, split, n):
    images, fine = fabricate.cifar100_arrays(120, 40, seed=2)[split]
    ds = registry.load("cifar100", split, str(cifar100_root))
    check_tensors(ds, images, fine)
    assert (ds.num_classes, ds.channels, ds.image_size) == (100, 3, 32)
    np.testing.assert_array_equal(fabricate.decode_label(ds.images), ds.labels.numpy())
    assert ds.class_names == fabricate.CIFAR100_FINE
    assert ds.superclass_names == fabricate.CIFAR100_COARSE_NAMES
    coarse = _pickle_labels(Path(cifar100_root) / "cifar-100-python" / split, "coarse_labels")
    np.testing.assert_array_equal(ds.superclass_labels.numpy(), coarse)
    np.testing.assert_array_equal(ds.superclass_labels.numpy(), fabricate.CIFAR100_COARSE[fine])
    assert ds.mean == registry.CIFAR100_MEAN and ds.std == registry.CIFAR100_STD
    # subset keeps labels, images and superclasses together.
    part = ds.subset([5, 0, 7])
    np.testing.assert_array_equal(part.images.numpy(), images[[5, 0, 7]])
    np.testing.assert_array_equal(part.superclass_labels.numpy(), coarse[[5, 0, 7]])


@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar100_20_uses_the_pickles_coarse_labels(cifar100_root, split):
    images, fine = fabricate.cifar100_arrays(120, 40, seed=2)[split]
    ds = registry.load("cifar100_20", split, str(cifar100_root))
    coarse = _pickle_labels(Path(cifar100_root) / "cifar-100-python" / split, "coarse_labels")
    check_tensors(ds, images, coarse)
    assert ds.num_classes == 20 and ds.class_names == fabricate.CIFAR100_COARSE_NAMES
    assert ds.labels.min() >= 0 and ds.labels.max() <= 19
    # The fabricated map disagrees with the IIC table: a hand-typed table would fail the equality above.
    assert (np.asarray(IIC_COARSE)[fine] != coarse).mean() > 0.5


# ---- STL-10 --------------------------------------------------------------------------------------------------------

def test_stl10_binary_is_column_major(stl10_root):
    images, labels = fabricate.stl10_arrays(20, 12, 15, seed=3)["train"]
    ds = registry.load("stl10", "train", str(stl10_root))
    # The fabricated arrays are row-major; the files hold them transposed, so equality means the reader transposes.
    check_tensors(ds, images, labels)
    assert (ds.num_classes, ds.channels, ds.image_size) == (10, 3, 96)
    raw = np.fromfile(Path(stl10_root) / "stl10_binary" / "train_X.bin", dtype=np.uint8).reshape(-1, 3, 96, 96)
    assert not np.array_equal(raw, images)
    np.testing.assert_array_equal(fabricate.decode_label(ds.images), labels)
    assert ds.class_names == fabricate.STL10_CLASSES
    # Labels 1..10 on disk, 0..9 in memory.
    file_labels = np.fromfile(Path(stl10_root) / "stl10_binary" / "train_y.bin", dtype=np.uint8)
    np.testing.assert_array_equal(ds.labels.numpy(), file_labels.astype(np.int64) - 1)
    assert set(ds.labels.tolist()) == set(range(10))


def test_stl10_test_and_unlabeled(stl10_root):
    arrays = fabricate.stl10_arrays(20, 12, 15, seed=3)
    test = registry.load("stl10", "test", str(stl10_root))
    check_tensors(test, *arrays["test"])
    unlabeled = registry.load("stl10", "unlabeled", str(stl10_root))
    check_tensors(unlabeled, arrays["unlabeled"][0], np.full(15, -1))
    assert unlabeled.num_classes == 10
    # Normalisation statistics come from the training images (the first 10000 of the split, here all of them).
    train_images = arrays["train"][0].astype(np.float64) / 255
    np.testing.assert_allclose(test.mean, train_images.mean(axis=(0, 2, 3)), atol=1e-4)
    np.testing.assert_allclose(test.std, train_images.std(axis=(0, 2, 3)), atol=1e-4)


def test_stl10_train_plus_unlabeled_concatenates(stl10_root):
    arrays = fabricate.stl10_arrays(20, 12, 15, seed=3)
    ds = registry.load("stl10", "train+unlabeled", str(stl10_root))
    check_tensors(ds, np.concatenate([arrays["train"][0], arrays["unlabeled"][0]]),
                  np.concatenate([arrays["train"][1], np.full(15, -1)]))
    assert (ds.labels[:20] >= 0).all() and (ds.labels[20:] == -1).all()


def test_stl10_with_only_its_training_files_loads_the_training_split(tmp_path):
    """With train_X.bin and train_y.bin only, the training split said there was no stl10_binary/ at all; the test
    split names the file it lacks."""
    fabricate.make_stl10(tmp_path, n_train=6, n_test=3, n_unlabeled=4, seed=2)
    for name in ("test_X.bin", "test_y.bin", "unlabeled_X.bin"):
        (tmp_path / "stl10_binary" / name).unlink()
    check_tensors(registry.load("stl10", "train", str(tmp_path)), *fabricate.stl10_arrays(6, 3, 4, seed=2)["train"])
    assert "test_X.bin" in data_error(registry.load, "stl10", "test", str(tmp_path))


def test_stl10_images_are_read_in_chunks_into_one_array(tmp_path):
    """More images than one read (256), in two files: every image, across the reads' and the files' borders, lands
    where it belongs; loading holds the set once, plus one read and one channel of the images the statistics count
    (here all, a third of the set; 10,000 of 105,000 in STL-10's): the whole file read, then transposed, held two."""
    fabricate.make_stl10(tmp_path, n_train=1030, n_test=3, n_unlabeled=1100, seed=5)
    arrays = fabricate.stl10_arrays(1030, 3, 1100, seed=5)
    tracemalloc.start()
    try:
        ds = registry.load("stl10", "train+unlabeled", str(tmp_path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1.5 * ds.images.nbytes
    check_tensors(ds, np.concatenate([arrays["train"][0], arrays["unlabeled"][0]]),
                  np.concatenate([arrays["train"][1], np.full(1100, -1)]))


# ---- Fashion-MNIST -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("split,n", [("train", 60), ("test", 30)])
def test_fashion_mnist_fabricated(fashion_root, split, n):
    arrays = fabricate.fashion_mnist_arrays(60, 30, seed=4)
    ds = registry.load("fashion_mnist", split, str(fashion_root))
    check_tensors(ds, *arrays[split])
    assert (ds.num_classes, ds.channels, ds.image_size) == (10, 1, 28)
    assert ds.class_names == registry.FASHION_MNIST_CLASSES
    np.testing.assert_array_equal(fabricate.decode_label(ds.images), ds.labels.numpy())
    scaled = arrays["train"][0].astype(np.float64) / 255
    np.testing.assert_allclose(ds.mean, [scaled.mean()], atol=1e-4)
    np.testing.assert_allclose(ds.std, [scaled.std()], atol=1e-4)


def test_fashion_mnist_uncompressed_and_torchvision_layout(tmp_path, fashion_root):
    # torchvision's download leaves FashionMNIST/raw/*-ubyte (and .gz); plain files are read as well.
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in Path(fashion_root).glob("*.gz"):
        (raw / gz.stem).write_bytes(gzip.decompress(gz.read_bytes()))
    ds = registry.load("fashion_mnist", "test", str(tmp_path))
    check_tensors(ds, *fabricate.fashion_mnist_arrays(60, 30, seed=4)["test"])
    # torchvision's own reader agrees (the fabricated files are real IDX).
    from torchvision import datasets

    theirs = datasets.FashionMNIST(str(tmp_path), train=False)
    assert torch.equal(theirs.data, ds.images[:, 0]) and torch.equal(theirs.targets, ds.labels)


def test_fashion_mnist_real_files():
    require_installed([FASHION_DIR / f"{name}.gz" for name in FASHION_FILES], "dataset-fashion-mnist")
    test = registry.load("fashion_mnist", "test")  # the default path
    train = registry.load("fashion_mnist", "train", str(FASHION_DIR))
    assert tuple(train.images.shape) == (60000, 1, 28, 28) and tuple(test.images.shape) == (10000, 1, 28, 28)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert (train.channels, train.image_size, train.num_classes) == (1, 28, 10)
    # Fashion-MNIST is balanced: 6000 / 1000 images per class.
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert test.mean == train.mean and 0.28 < train.mean[0] < 0.29 and 0.35 < train.std[0] < 0.36


def test_missing_data_skips_and_fails_under_ci(monkeypatch, tmp_path):
    """A missing dataset skips its test, except under CLUSTERLAB_REQUIRE_DATA=1 (CI), where it fails."""
    monkeypatch.delenv("CLUSTERLAB_REQUIRE_DATA", raising=False)
    require_installed([tmp_path], "dataset-x")
    with pytest.raises(pytest.skip.Exception, match="dataset-x"):
        require_installed([tmp_path, tmp_path / "absent.gz"], "dataset-x")
    monkeypatch.setenv("CLUSTERLAB_REQUIRE_DATA", "1")
    with pytest.raises(pytest.fail.Exception, match="CLUSTERLAB_REQUIRE_DATA=1 but .*absent.gz"):
        require_installed([tmp_path / "absent.gz"], "dataset-x")


def test_ci_reports_any_skipped_test_as_failed(monkeypatch):
    """.ci/run sets CLUSTERLAB_NO_SKIPS=1: a skip for any reason (no C++ compiler for --compile, no mount namespace
    for the disk-full tests) fails with its reason; elsewhere it stays a skip."""
    from conftest import refuse_skip

    def skipped():
        return pytest.TestReport("t.py::t", ("t.py", 1, "t"), {}, "skipped", ("t.py", 1, "Skipped: no g++"), "setup")

    monkeypatch.delenv("CLUSTERLAB_NO_SKIPS", raising=False)
    report = skipped()
    refuse_skip(report)
    assert report.skipped
    monkeypatch.setenv("CLUSTERLAB_NO_SKIPS", "1")
    report = skipped()
    refuse_skip(report)
    assert report.failed and report.longrepr == ("CLUSTERLAB_NO_SKIPS=1 (CI runs every test), but it was skipped: "
                                                 "Skipped: no g++")


# ---- digits --------------------------------------------------------------------------------------------------------

def test_digits_split_is_stratified_and_deterministic():
    train, test = registry.load("digits", "train"), registry.load("digits", "test")
    assert len(train) + len(test) == 1797 and abs(len(train) - len(test)) <= 1
    assert (train.channels, train.image_size, train.num_classes) == (1, 8, 10)
    assert train.images.dtype == torch.uint8 and int(train.images.max()) == 255
    per_class = torch.bincount(train.labels, minlength=10) - torch.bincount(test.labels, minlength=10)
    assert per_class.abs().max() <= 1
    # The two splits partition the dataset: every (image, label) pair of sklearn appears exactly once.
    from sklearn.datasets import load_digits

    digits = load_digits()
    every = np.rint(digits.images * (255 / 16)).astype(np.uint8).reshape(1797, -1)
    both = torch.cat([train.images, test.images]).reshape(1797, -1).numpy()
    both_labels = torch.cat([train.labels, test.labels]).numpy()
    key = lambda rows, labels: sorted(zip(map(bytes, rows), labels.tolist()))  # noqa: E731
    assert key(both, both_labels) == key(every, digits.target)
    again = registry.load("digits", "train")
    assert torch.equal(again.images, train.images) and torch.equal(again.labels, train.labels)
    assert test.mean == train.mean


# ---- image folders -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("grey,channels", [(True, 1), (False, 3)])
def test_imagefolder(tmp_path, grey, channels):
    fabricate.make_imagefolder(tmp_path, n_per_class=4, classes=3, size=28, grey=grey, seed=5)
    arrays = fabricate.imagefolder_arrays(4, 3, 28, grey, seed=5)
    for split, folder in (("train", "train"), ("test", "val")):
        ds = registry.load("imagefolder", split, str(tmp_path))
        images, labels = arrays[folder]
        assert not ds.in_memory and len(ds.files) == 12
        assert (ds.channels, ds.image_size, ds.num_classes) == (channels, 28, 3)
        assert ds.class_names == fabricate.imagefolder_classes(3)
        np.testing.assert_array_equal(ds.labels.numpy(), labels)
        assert all(Path(f).parent.name == ds.class_names[y] for f, y in zip(ds.files, labels))
        np.testing.assert_array_equal(centre_views(ds, ds.image_size).numpy(), images)
    train_scaled = arrays["train"][0].astype(np.float64) / 255
    np.testing.assert_allclose(ds.mean, train_scaled.mean(axis=(0, 2, 3)), atol=1e-4)


def centre_views(ds, crop, resize=0) -> torch.Tensor:
    """Every image's test view (shorter side resized to `resize`, centre crop), stacked."""
    return torch.cat([batch for batch, _ in loader.sequential(ds, torch.arange(len(ds)), 5,
                                                              view=EvalView.of(crop, resize))])


def test_imagefolder_does_not_depend_on_the_first_file(tmp_path):
    from PIL import Image

    fabricate.make_imagefolder(tmp_path, n_per_class=2, classes=2, size=20, grey=True)
    # The first file is larger, not square and in colour: the nominal size is the sample's median shorter side,
    # and one colour image makes the set RGB (the grey ones are converted).
    Image.new("RGB", (50, 40), (10, 20, 30)).save(tmp_path / "train" / "class_a" / "0000.png")
    ds = registry.load("imagefolder", "train", str(tmp_path))
    assert ds.image_size == 20 and ds.channels == 3
    views = centre_views(ds, 20)
    assert tuple(views.shape) == (4, 3, 20, 20) and views[0, :, 10, 10].tolist() == [10, 20, 30]
    # The grey images became three equal channels.
    assert torch.equal(views[1:, 0], views[1:, 1]) and torch.equal(views[1:, 0], views[1:, 2])


# ---- bad input -----------------------------------------------------------------------------------------------------

def test_unknown_dataset_and_split():
    assert "'imagenet'" in data_error(registry.load, "imagenet", "train")
    message = data_error(registry.load, "cifar10", "val", "/nonexistent")
    assert "'val'" in message and "train" in message
    assert "'train+test'" in data_error(registry.load, "stl10", "train+test", "/nonexistent")


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "cifar100_20", "stl10", "fashion_mnist", "imagefolder"])
def test_missing_data_path(tmp_path, name):
    missing = tmp_path / "no_such_dir"
    assert str(missing) in data_error(registry.load, name, "train", str(missing))


@pytest.mark.parametrize("name,inner", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"),
                                        ("stl10", "stl10_binary"), ("fashion_mnist", "train-images-idx3-ubyte"),
                                        ("imagefolder", "train")])
def test_empty_data_path(tmp_path, name, inner):
    message = data_error(registry.load, name, "train", str(tmp_path))
    assert str(tmp_path) in message and inner in message


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "cifar100_20", "stl10", "fashion_mnist", "imagefolder"])
@pytest.mark.parametrize("download", [False, True])
def test_data_path_that_is_a_file(tmp_path, name, download):
    """With --download, making the folder raised FileExistsError (a traceback) before anything was fetched."""
    (tmp_path / "file").write_text("not a folder")
    message = data_error(registry.load, name, "train", str(tmp_path / "file"), download=download)
    assert f"{str(tmp_path / 'file')!r} is a file, not a folder" in message and "--data_path DIR" in message


@pytest.mark.parametrize("name", ["fashion_mnist", "cifar10"])
def test_download_of_data_already_there_fetches_and_writes_nothing(tmp_path, name):
    """The loaders read layouts torchvision does not look for (Debian's flat Fashion-MNIST folder, --data_path at
    cifar-10-batches-py/ itself): with --download they load as without it; torchvision made its own folder there
    and went to the network (a traceback offline)."""
    root = Path(fabricate.make_fashion_mnist(tmp_path) if name == "fashion_mnist"
                else Path(fabricate.make_cifar10(tmp_path)) / "cifar-10-batches-py")
    before = sorted(root.rglob("*"))
    assert len(registry.load(name, "train", str(root), download=True)) == 100
    assert sorted(root.rglob("*")) == before


def unreachable_cifar10() -> None:
    """CIFAR-10's download address pointed at a closed local port: a download that fails as it would offline."""
    import torchvision.datasets

    torchvision.datasets.CIFAR10.url = "http://127.0.0.1:9/cifar-10-python.tar.gz"


class CorruptArchive:
    """A fetcher whose download ends in what a corrupt archive raises (not an OSError)."""

    def fetch(self, path, download):
        import tarfile

        raise tarfile.ReadError("file could not be opened successfully")


def download_unreachable(rank: int, world_size: int, path: str, corrupt: bool = False) -> str:
    unreachable_cifar10()
    if corrupt:
        registry.DATASETS["cifar10"] = dataclasses.replace(registry.DATASETS["cifar10"], fetcher=CorruptArchive())
    with pytest.raises(DataError) as info:
        registry.load("cifar10", "train", path, download=True)
    return str(info.value)


def test_a_failed_download_is_one_line_on_every_rank(tmp_path, monkeypatch):
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "url", torchvision.datasets.CIFAR10.url)
    unreachable_cifar10()
    path = str(tmp_path / "cifar")
    message = data_error(registry.load, "cifar10", "train", path, download=True)
    assert message.startswith(f"dataset 'cifar10': --download into {path!r} failed (URLError: ")
    assert message.endswith("pass --data_path")
    # rank 0 downloads; the other rank, waiting for it, stops too (it waited in a barrier, then failed with gloo's
    # "connection closed by peer" traceback once rank 0 had died)
    first, second = run_distributed(download_unreachable, 2, path)
    assert first.startswith(f"dataset 'cifar10': --download into {path!r} failed (URLError: ")
    assert second == "dataset 'cifar10': --download failed on rank 0 (its error names why)"
    first, second = run_distributed(download_unreachable, 2, path, True)
    assert "failed (ReadError: file could not be opened successfully)" in first
    assert second == "dataset 'cifar10': --download failed on rank 0 (its error names why)"


def test_a_failed_download_names_what_the_files_already_there_lack(tmp_path):
    """A batch cut short, with --download and no network: the download's failure hid the loader's message, which
    says what to mend."""
    unreachable_cifar10()
    (_cifar10(tmp_path) / "data_batch_3").write_bytes(b"\x80\x02")
    message = data_error(registry.load, "cifar10", "train", str(tmp_path), download=True)
    assert "failed (URLError: " in message
    assert f"what the folder holds does not load (CIFAR batch {str(tmp_path / 'cifar-10-batches-py' / 'data_batch_3')!r} " \
           f"is corrupt" in message


def test_digits_note_once_a_data_path_they_do_not_read(tmp_path, capsys):
    """It was ignored without a word. Not refused: digits scripts passed one, and their runs recorded it."""
    for split in ("train", "test", "train"):
        assert len(registry.load("digits", split, str(tmp_path))) > 0
    assert capsys.readouterr().out == (f"note: dataset 'digits' ships inside scikit-learn: --data_path "
                                       f"{str(tmp_path)!r} is not read\n")


def test_download_refused_for_local_datasets(tmp_path):
    assert "'imagefolder'" in data_error(registry.load, "imagefolder", "train", str(tmp_path), download=True)
    # a missing folder suggests --download only where it would fetch something
    assert "--download" not in data_error(registry.load, "imagefolder", "train", str(tmp_path / "none"))
    assert "--download" in data_error(registry.load, "cifar10", "train", str(tmp_path / "none"))


def _gz(path: Path, payload: bytes) -> Path:
    with gzip.open(path, "wb") as handle:
        handle.write(payload)
    return path


def test_idx_reader_round_trip(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    read = read_idx(_gz(tmp_path / "a.gz", fabricate.idx_bytes(array)))
    np.testing.assert_array_equal(read, array)
    # Writable memory: torch.from_numpy of a read-only array gives a tensor whose in-place writes are undefined.
    assert read.flags.writeable
    (tmp_path / "b").write_bytes(fabricate.idx_bytes(array))
    np.testing.assert_array_equal(read_idx(tmp_path / "b"), array)
    # Big-endian int32 data (type 0x0C).
    values = np.array([1, -2, 70000], dtype=">i4")
    (tmp_path / "c").write_bytes(bytes([0, 0, 0x0C, 1]) + (3).to_bytes(4, "big") + values.tobytes())
    np.testing.assert_array_equal(read_idx(tmp_path / "c"), [1, -2, 70000])


@pytest.mark.parametrize("payload,words", [
    (bytes([0, 0, 8, 3, 0, 0, 0, 5]), "truncated inside its header"),
    (fabricate.idx_bytes(np.zeros((4, 28, 28), np.uint8))[:-10], "truncated or padded"),
    (fabricate.idx_bytes(np.zeros((4, 28, 28), np.uint8)) + b"\0", "truncated or padded"),
    # the message shows the bytes found and what a magic number holds
    (bytes([8, 3, 0, 0]) + fabricate.idx_bytes(np.zeros((4, 2, 2), np.uint8))[4:],
     "starts with 08 03 00 00, not an IDX magic number (00 00, a type in 08, 09, 0B, 0C, 0D, 0E"),
    (bytes([0, 0, 0x42, 1, 0, 0, 0, 1, 0]), "starts with 00 00 42 01, not an IDX magic number"),
    (b"\0\0", "starts with 00 00, not an IDX magic number"),
    # sizes are unsigned: read as signed, -2 x -2 x 1 matched the 4 data bytes and reshape raised a ValueError
    (bytes([0, 0, 8, 3]) + (-2).to_bytes(4, "big", signed=True) * 2 + (1).to_bytes(4, "big") + bytes(4),
     "truncated or padded"),
])
def test_idx_reader_rejects(tmp_path, payload, words):
    path = _gz(tmp_path / "broken-idx3-ubyte.gz", payload)
    message = data_error(read_idx, path)
    assert str(path) in message and words in message


def test_idx_reader_bad_gzip_and_missing(tmp_path):
    good = fabricate.idx_bytes(np.zeros((4, 28, 28), np.uint8))
    compressed = gzip.compress(good)
    (tmp_path / "cut.gz").write_bytes(compressed[: len(compressed) // 2])
    assert str(tmp_path / "cut.gz") in data_error(read_idx, tmp_path / "cut.gz")
    (tmp_path / "plain.gz").write_bytes(good)  # not gzip at all
    assert str(tmp_path / "plain.gz") in data_error(read_idx, tmp_path / "plain.gz")
    assert "does not exist" in data_error(read_idx, tmp_path / "none.gz")


def test_fashion_mnist_truncated_file_named(tmp_path):
    fabricate.make_fashion_mnist(tmp_path, n_train=20, n_test=10)
    bad = tmp_path / "t10k-images-idx3-ubyte.gz"
    _gz(bad, fabricate.idx_bytes(np.zeros((10, 28, 28), np.uint8))[:-100])
    assert str(bad) in data_error(registry.load, "fashion_mnist", "test", str(tmp_path))


def test_fashion_mnist_images_not_three_dimensional(tmp_path):
    fabricate.make_fashion_mnist(tmp_path, n_train=20, n_test=10)
    bad = _gz(tmp_path / "t10k-images-idx3-ubyte.gz", fabricate.idx_bytes(np.zeros((10, 784), np.uint8)))
    message = data_error(registry.load, "fashion_mnist", "test", str(tmp_path))
    assert str(bad) in message and "(10, 784)" in message


def test_fashion_mnist_without_images(tmp_path):
    """An IDX file of 0 images loaded, with NaN statistics."""
    fabricate.make_fashion_mnist(tmp_path, n_train=20, n_test=10)
    _gz(tmp_path / "t10k-labels-idx1-ubyte.gz", fabricate.idx_bytes(np.zeros(0, np.uint8)))
    bad = _gz(tmp_path / "t10k-images-idx3-ubyte.gz", fabricate.idx_bytes(np.zeros((0, 28, 28), np.uint8)))
    message = data_error(registry.load, "fashion_mnist", "test", str(tmp_path))
    assert str(bad) in message and "(0, 28, 28)" in message and "N > 0" in message


def test_fashion_mnist_label_count_mismatch(tmp_path):
    fabricate.make_fashion_mnist(tmp_path, n_train=20, n_test=10)
    bad = _gz(tmp_path / "t10k-labels-idx1-ubyte.gz", fabricate.idx_bytes(np.zeros(9, np.uint8)))
    message = data_error(registry.load, "fashion_mnist", "test", str(tmp_path))
    assert str(bad) in message and "9" in message and "10" in message


def test_fashion_mnist_label_outside_the_classes(tmp_path):
    fabricate.make_fashion_mnist(tmp_path, n_train=20, n_test=10)
    bad = _gz(tmp_path / "t10k-labels-idx1-ubyte.gz", fabricate.idx_bytes(np.array([0, 1, 12, 3, 4, 5, 6, 7, 8, 9])))
    message = data_error(registry.load, "fashion_mnist", "test", str(tmp_path))
    assert str(bad) in message and "label 12" in message and "0..9" in message


@pytest.mark.parametrize("split", ["train", "test"])  # the test split reads the training images for its statistics
def test_fashion_mnist_idx_of_another_type_than_bytes(tmp_path, split):
    fabricate.make_fashion_mnist(tmp_path, n_train=20, n_test=10)
    values = np.zeros((20, 28, 28), dtype=">i4")  # IDX type 0x0C: big-endian int32
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    _gz(bad, bytes([0, 0, 0x0C, 3]) + b"".join(n.to_bytes(4, "big") for n in values.shape) + values.tobytes())
    message = data_error(registry.load, "fashion_mnist", split, str(tmp_path))
    assert str(bad) in message and ">i4" in message and "0x08" in message


def _cifar10(tmp_path) -> Path:
    fabricate.make_cifar10(tmp_path, n_train=10, n_test=5)
    return tmp_path / "cifar-10-batches-py"


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "not_a_dict", "no_data", "unknown_module",
                                    "unknown_attribute", "bad_text"])
def test_corrupt_cifar_pickle(tmp_path, damage):
    bad = _cifar10(tmp_path) / "data_batch_3"
    content = bad.read_bytes()
    if damage == "truncate":
        bad.write_bytes(content[: len(content) // 2])
    elif damage == "garbage":
        bad.write_bytes(bytes(range(256)) * 4)
    elif damage == "empty":
        bad.write_bytes(b"")
    elif damage == "unknown_module":  # what a flipped byte inside a GLOBAL opcode gives: ModuleNotFoundError
        bad.write_bytes(b"\x80\x02cno_such_module\nthing\nq\x00.")
    elif damage == "unknown_attribute":  # AttributeError
        bad.write_bytes(b"\x80\x02cnumpy\nno_such_attribute\nq\x00.")
    elif damage == "bad_text":  # UnicodeDecodeError from a BINUNICODE string
        bad.write_bytes(b"\x80\x02X\x02\x00\x00\x00\xff\xfeq\x00.")
    elif damage == "not_a_dict":
        bad.write_bytes(pickle.dumps([1, 2, 3]))
    else:
        bad.write_bytes(pickle.dumps({"labels": [0, 1]}))
    assert str(bad) in data_error(registry.load, "cifar10", "train", str(tmp_path))
    # The test split does not read that file.
    assert len(registry.load("cifar10", "test", str(tmp_path))) == 5


def test_cifar_labels_written_as_numpy_numbers_load(tmp_path):
    """A batch whose labels are a list of numpy integers (`list(labels_array)`), as plain pickle.load reads it."""
    folder = _cifar10(tmp_path)
    labels = np.arange(5, dtype=np.int64) % 10
    with open(folder / "test_batch", "wb") as handle:
        pickle.dump({"data": np.zeros((5, 3072), np.uint8), "labels": list(labels)}, handle)
    assert registry.load("cifar10", "test", str(tmp_path)).labels.tolist() == labels.tolist()


@pytest.mark.parametrize("protocol", [None, 2, 3, 4, 5], ids=lambda p: "python2" if p is None else f"protocol{p}")
def test_cifar_pickles_load_in_every_format_numpy_and_pickle_write(tmp_path, protocol):
    """Python 2's format (the real files: byte strings, numpy.core), Python 3's protocol 2 (bytes through
    _codecs.encode), 3 and 4 (numpy._core reconstruct) and 5 (numpy's buffer) all pass the restricted unpickler."""
    fabricate.make_cifar100(tmp_path, n_train=10, n_test=5, protocol=protocol)
    images, fine = fabricate.cifar100_arrays(10, 5)["train"]
    ds = registry.load("cifar100_20", "train", str(tmp_path))
    check_tensors(ds, images, fabricate.CIFAR100_COARSE[fine])
    assert ds.class_names == fabricate.CIFAR100_COARSE_NAMES


def test_python2_cifar_pickle_holds_what_the_real_files_hold(tmp_path):
    """The fabricated Python 2 pickle: protocol 2, byte strings only, numpy 1.x's global names."""
    import pickletools

    raw = (_cifar10(tmp_path) / "data_batch_1").read_bytes()
    opcodes = [(op.name, arg) for op, arg, _ in pickletools.genops(raw)]
    assert raw[:2] == b"\x80\x02"
    assert sorted({arg for name, arg in opcodes if name == "GLOBAL"}) == [
        "numpy dtype", "numpy ndarray", "numpy.core.multiarray _reconstruct"]
    assert not any("UNICODE" in name for name, _ in opcodes)


class _RunsACommand:
    def __init__(self, call, command):
        self.call, self.command = call, command

    def __reduce__(self):
        return self.call, (self.command,)


@pytest.mark.parametrize("call, named", [(os.system, f"{os.system.__module__}.system"), (exec, "__builtin__.exec")])
def test_cifar_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path, call, named):
    folder = _cifar10(tmp_path)
    marker = tmp_path / "PWNED"
    command = f"open({str(marker)!r}, 'w')" if call is exec else f"touch {marker}"
    bad = folder / "data_batch_1"
    with open(bad, "wb") as handle:
        pickle.dump({"data": _RunsACommand(call, command), "labels": [0]}, handle, protocol=2)
    message = data_error(registry.load, "cifar10", "train", str(tmp_path))
    assert str(bad) in message and named in message and "refused" in message
    assert not marker.exists()
    # Control: plain pickle.load on the same file does run it, so the test would catch a reader that runs it.
    with open(bad, "rb") as handle:
        pickle.load(handle)
    assert marker.exists()


@pytest.mark.parametrize("payload", [
    b"\x80\x02cnumpy\nload\nq\x00.",  # a numpy function CIFAR never holds
    b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x04\x00\x00\x00zlib\x86R.",  # encode, not as latin1
    b"\x80\x02cbuiltins\nbytes\nJ\x00\x00\x00\x7f\x85R.",  # bytes(2 GB), not empty bytes
], ids=["numpy.load", "encode-zlib", "bytes-size"])
def test_cifar_pickle_allows_its_globals_only_as_numpy_and_pickle_use_them(tmp_path, payload):
    bad = _cifar10(tmp_path) / "test_batch"
    bad.write_bytes(payload)
    message = data_error(registry.load, "cifar10", "test", str(tmp_path))
    assert str(bad) in message and "refused" in message


def test_cifar_wrong_shape_missing_batch_and_label_mismatch(tmp_path):
    folder = _cifar10(tmp_path)
    with open(folder / "test_batch", "wb") as handle:
        pickle.dump({"data": np.zeros((5, 1024), np.uint8), "labels": [0] * 5}, handle)
    message = data_error(registry.load, "cifar10", "test", str(tmp_path))
    assert str(folder / "test_batch") in message and "3072" in message
    with open(folder / "test_batch", "wb") as handle:
        pickle.dump({"data": np.zeros((5, 3072), np.uint8), "labels": [0] * 4}, handle)
    message = data_error(registry.load, "cifar10", "test", str(tmp_path))
    assert str(folder / "test_batch") in message and "4 labels for 5 images" in message
    (folder / "data_batch_2").unlink()
    assert str(folder / "data_batch_2") in data_error(registry.load, "cifar10", "train", str(tmp_path))


def _repickle(path: Path, **changes) -> None:
    with open(path, "rb") as handle:
        content = pickle.load(handle, encoding="latin1")
    with open(path, "wb") as handle:
        pickle.dump({**content, **changes}, handle)


@pytest.mark.parametrize("name, file, key, classes", [
    ("cifar10", "cifar-10-batches-py/data_batch_4", "labels", 10),
    ("cifar100", "cifar-100-python/train", "fine_labels", 100),
    ("cifar100_20", "cifar-100-python/train", "coarse_labels", 20),
])
@pytest.mark.parametrize("value", [-1, "classes"])
def test_cifar_labels_outside_the_classes(tmp_path, name, file, key, classes, value):
    """A label past the classes loaded, then failed in kNN's votes with a traceback (or went unnoticed)."""
    value = classes if value == "classes" else value
    make = fabricate.make_cifar10 if name == "cifar10" else fabricate.make_cifar100
    make(tmp_path, n_train=20, n_test=5)
    bad = tmp_path / file
    with open(bad, "rb") as handle:
        labels = pickle.load(handle, encoding="latin1")[key]
    labels[2] = value
    _repickle(bad, **{key: labels})
    message = data_error(registry.load, name, "train", str(tmp_path))
    assert str(bad) in message and f"{key!r} holds {value} (image 2)" in message and f"0..{classes - 1}" in message
    assert len(registry.load(name, "test", str(tmp_path))) == 5  # the test split does not read that file


def test_cifar_data_other_than_bytes(tmp_path):
    """Data cast to uint8 wrapped silently: floats in [0, 1] became black images, 256 became 0."""
    folder = _cifar10(tmp_path)
    with open(folder / "test_batch", "rb") as handle:
        data = pickle.load(handle, encoding="latin1")["data"]
    _repickle(folder / "test_batch", data=data.astype(np.float32) / 255)
    message = data_error(registry.load, "cifar10", "test", str(tmp_path))
    assert str(folder / "test_batch") in message and "float32" in message and "0..255" in message
    wider = data.astype(np.int64)
    wider[3, 7] = 256
    _repickle(folder / "test_batch", data=wider)
    message = data_error(registry.load, "cifar10", "test", str(tmp_path))
    assert "int64" in message and "to 256" in message
    _repickle(folder / "test_batch", data=[[0] * 3072, [0] * 5])
    assert "no array" in data_error(registry.load, "cifar10", "test", str(tmp_path))
    _repickle(folder / "test_batch", data=data, labels=["cat"] * 5)
    assert "labels that are no integers" in data_error(registry.load, "cifar10", "test", str(tmp_path))
    _repickle(folder / "test_batch", labels=[0.5, 1, 2, 3, 4])  # a cast made 0.5 class 0
    assert "labels that are no integers (dtype float64)" in data_error(registry.load, "cifar10", "test", str(tmp_path))
    _repickle(folder / "test_batch", data=data[:0], labels=[])  # loaded as an empty split, NaN statistics
    assert "shape (0, 3072)" in data_error(registry.load, "cifar10", "test", str(tmp_path))
    _repickle(folder / "test_batch", data=data, labels=3)
    assert "1 labels for 5 images" in data_error(registry.load, "cifar10", "test", str(tmp_path))
    _repickle(folder / "test_batch", labels=[])  # numpy's empty list is float64: still a count
    assert "0 labels for 5 images" in data_error(registry.load, "cifar10", "test", str(tmp_path))
    # whole numbers 0..255 of another integer type are the same pixels
    _repickle(folder / "test_batch", data=data.astype(np.int64), labels=[0] * 5)
    ds = registry.load("cifar10", "test", str(tmp_path))
    np.testing.assert_array_equal(ds.images.numpy(), fabricate.cifar10_arrays(10, 5)["test"][0])


@pytest.mark.parametrize("name", ["cifar100", "cifar100_20"])
def test_cifar100_fine_class_in_two_superclasses(tmp_path, name):
    """The superclass view maps each fine class to one superclass: a fine class with two scored by the last."""
    fabricate.make_cifar100(tmp_path, n_train=20, n_test=5)
    bad = tmp_path / "cifar-100-python" / "test"
    with open(bad, "rb") as handle:
        batch = pickle.load(handle, encoding="latin1")
    fine, coarse = batch["fine_labels"], batch["coarse_labels"]
    fine[1], coarse[1] = fine[0], (coarse[0] + 1) % 20
    _repickle(bad, fine_labels=fine, coarse_labels=coarse)
    message = data_error(registry.load, name, "test", str(tmp_path))
    assert str(bad) in message and f"fine label {fine[0]}" in message
    assert str(sorted([coarse[0], coarse[1]])) in message


def test_class_name_lists_of_another_length(tmp_path):
    """The names give the number of classes: 9 CIFAR-10 names made a 9-class set holding label 9."""
    folder = _cifar10(tmp_path)
    _repickle(folder / "batches.meta", label_names=fabricate.CIFAR10_CLASSES[:9])
    message = data_error(registry.load, "cifar10", "test", str(tmp_path))
    assert str(folder / "batches.meta") in message and "9 label_names, expected 10" in message
    fabricate.make_cifar100(tmp_path, n_train=10, n_test=5)
    _repickle(tmp_path / "cifar-100-python" / "meta", coarse_label_names=fabricate.CIFAR100_COARSE_NAMES + ["more"])
    assert "21 coarse_label_names, expected 20" in data_error(registry.load, "cifar100", "test", str(tmp_path))


def test_stl10_class_names_one_a_line(tmp_path):
    folder = _stl10(tmp_path)
    names = ["air plane", *fabricate.STL10_CLASSES[1:]]
    (folder / "class_names.txt").write_text("\n".join(names) + "\n\n")
    assert registry.load("stl10", "test", str(tmp_path)).class_names == names  # split on spaces: 11 classes
    (folder / "class_names.txt").write_text("airplane bird\ncar\n")
    message = data_error(registry.load, "stl10", "test", str(tmp_path))
    assert str(folder / "class_names.txt") in message and "2 class names, expected 10" in message
    (folder / "class_names.txt").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    message = data_error(registry.load, "stl10", "test", str(tmp_path))
    assert str(folder / "class_names.txt") in message and "is not text" in message


def test_corrupt_cifar_meta(tmp_path):
    folder = _cifar10(tmp_path)
    (folder / "batches.meta").write_bytes(b"\x80\x02}q\x00(X")
    assert str(folder / "batches.meta") in data_error(registry.load, "cifar10", "test", str(tmp_path))


def test_cifar100_without_coarse_labels(tmp_path):
    fabricate.make_cifar100(tmp_path, n_train=10, n_test=5)
    bad = tmp_path / "cifar-100-python" / "test"
    with open(bad, "wb") as handle:
        pickle.dump({"data": np.zeros((5, 3072), np.uint8), "fine_labels": [0] * 5}, handle)
    message = data_error(registry.load, "cifar100_20", "test", str(tmp_path))
    assert str(bad) in message and "coarse_labels" in message


def _stl10(tmp_path) -> Path:
    fabricate.make_stl10(tmp_path, n_train=4, n_test=3, n_unlabeled=2)
    return tmp_path / "stl10_binary"


def test_stl10_size_not_a_multiple_of_an_image(tmp_path):
    folder = _stl10(tmp_path)
    with open(folder / "train_X.bin", "ab") as handle:
        handle.write(b"\0" * 100)
    message = data_error(registry.load, "stl10", "train", str(tmp_path))
    assert str(folder / "train_X.bin") in message and "27648" in message
    (folder / "unlabeled_X.bin").write_bytes(b"")
    assert str(folder / "unlabeled_X.bin") in data_error(registry.load, "stl10", "unlabeled", str(tmp_path))


def test_stl10_images_cut_at_a_whole_image_name_both_files(tmp_path):
    """Cut at a multiple of 27,648 bytes, the images file read as fewer images, and only the intact labels file was
    named."""
    folder = _stl10(tmp_path)
    content = (folder / "test_X.bin").read_bytes()
    (folder / "test_X.bin").write_bytes(content[:27648])
    message = data_error(registry.load, "stl10", "test", str(tmp_path))
    assert str(folder / "test_X.bin") in message and "(1 images, 3 labels): one of them is cut short" in message


def test_stl10_label_problems(tmp_path):
    folder = _stl10(tmp_path)
    (folder / "test_y.bin").write_bytes(bytes([1, 2]))
    message = data_error(registry.load, "stl10", "test", str(tmp_path))
    assert f"{str(folder / 'test_X.bin')!r} and {str(folder / 'test_y.bin')!r} do not match (3 images, 2 labels)" \
        in message
    (folder / "test_y.bin").write_bytes(bytes([1, 0, 2]))  # 0 is not a class (1..10)
    message = data_error(registry.load, "stl10", "test", str(tmp_path))
    assert str(folder / "test_y.bin") in message and "labels outside 1..10 (the first: 0 at image 1; 1 of 3)" in message
    (folder / "test_y.bin").write_bytes(bytes([1, 11, 12]))
    message = data_error(registry.load, "stl10", "test", str(tmp_path))
    assert str(folder / "test_y.bin") in message and "labels outside 1..10 (the first: 11 at image 1; 2 of 3)" in message
    (folder / "train_y.bin").unlink()
    assert str(folder / "train_y.bin") in data_error(registry.load, "stl10", "train+unlabeled", str(tmp_path))


def test_imagefolder_problems(tmp_path):
    fabricate.make_imagefolder(tmp_path, n_per_class=1, classes=2)
    import shutil

    shutil.rmtree(tmp_path / "val")
    message = data_error(registry.load, "imagefolder", "test", str(tmp_path))
    assert str(tmp_path) in message and "val" in message
    shutil.rmtree(tmp_path / "train")
    (tmp_path / "train").mkdir()
    assert str(tmp_path / "train") in data_error(registry.load, "imagefolder", "train", str(tmp_path))


def test_a_colour_file_that_does_not_decode_leaves_a_grey_folder_grey(tmp_path, capsys):
    """Its header (RGB) still decided the channels: a grey folder's model took three."""
    from PIL import Image

    fabricate.make_imagefolder(tmp_path, n_per_class=3, classes=2, grey=True)
    bad = tmp_path / "train" / registry._class_folders(tmp_path / "train")[0] / "cut.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(bad)
    bad.write_bytes(bad.read_bytes()[:len(bad.read_bytes()) // 2])  # the header reads, the pixels do not
    ds = registry.load("imagefolder", "train", str(tmp_path))
    assert ds.channels == 1 and len(ds.mean) == 1
    assert f"unreadable image file {bad} (" in capsys.readouterr().out


def test_image_files_in_no_class_folder_are_named_once(tmp_path, capsys):
    fabricate.make_imagefolder(tmp_path, n_per_class=2, classes=2)
    image = next((tmp_path / "train").rglob("*.png")).read_bytes()
    for name in ("b.png", "a.PNG"):
        (tmp_path / "train" / name).write_bytes(image)
    (tmp_path / "train" / "notes.txt").write_text("not an image")
    first = registry.load("imagefolder", "train", str(tmp_path))
    registry.load("imagefolder", "test", str(tmp_path))
    out = capsys.readouterr().out
    assert out.count("note: ") == 1
    assert f"note: 2 image file(s) lie directly in {str(tmp_path / 'train')!r}, in no class folder (first: a.PNG): " \
           f"left out" in out
    assert len(first) == 4


def test_a_folder_with_both_val_and_test_says_which_it_evaluates_on(tmp_path, capsys):
    """val/ is taken before test/; with both present, the test/ images were left out without a word."""
    fabricate.make_imagefolder(tmp_path, n_per_class=2, classes=2)
    shutil.copytree(tmp_path / "val", tmp_path / "test")
    (next((tmp_path / "test").rglob("*.png"))).unlink()
    for split in ("train", "test", "test"):
        registry.load("imagefolder", split, str(tmp_path))
    out = capsys.readouterr().out
    assert out.count("note: ") == 1
    assert f"note: {str(tmp_path)!r} has both val/ and test/: the evaluations use val/ (test/ is left out)" in out
    evaluated = registry.load("imagefolder", "test", str(tmp_path))
    assert len(evaluated) == 4
    # the result lines name the folder the scores are of (they said "test" of val/)
    assert (evaluated.split_name, registry.load("imagefolder", "train", str(tmp_path)).split_name) == ("val", "train")
    shutil.rmtree(tmp_path / "val")
    assert registry.load("imagefolder", "test", str(tmp_path)).split_name == "test"
    assert registry.load("digits", "test").split_name == "test"


def test_notes_about_an_image_folder_are_printed_by_rank_0_only(tmp_path, capsys, monkeypatch):
    """Every rank loads the same folder and samples the same files for its statistics: each printed the same notes
    and named the same unreadable file, once per process."""
    from clusterlab import distributed

    fabricate.make_imagefolder(tmp_path, n_per_class=2, classes=2)
    (tmp_path / "train" / "loose.png").write_bytes(next((tmp_path / "train").rglob("*.png")).read_bytes())
    fabricate.spoil_image_files([sorted((tmp_path / "train").rglob("0000.png"))[0]])
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    registry.load("imagefolder", "train", str(tmp_path))
    assert capsys.readouterr().out == ""
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    registry._STATISTICS.clear()
    registry._NOTED.clear()
    registry.load("imagefolder", "train", str(tmp_path))
    out = capsys.readouterr().out
    assert "lie directly in" in out and "left out of the statistics" in out


def test_imagefolder_grey_with_alpha_is_one_channel(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for label in ("a", "b"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            Image.new("LA", (10, 10), (40 if label == "a" else 200, 128)).save(folder / "0.png")
    ds = registry.load("imagefolder", "train", str(tmp_path))
    assert (ds.channels, ds.image_size) == (1, 10)
    assert centre_views(ds, 10)[1].unique().tolist() == [200]


def test_imagefolder_statistics_sample_every_class(tmp_path):
    # 2 x 1100 images: the statistics sample (2000 files) must not be the first class plus part of the second.
    from PIL import Image

    for label, value in (("a", 0), ("b", 255)):
        folder = tmp_path / "train" / label
        folder.mkdir(parents=True)
        image = Image.new("L", (2, 2), value)
        for i in range(1100):
            image.save(folder / f"{i:04d}.png")
    ds = registry.load("imagefolder", "train", str(tmp_path))
    assert abs(ds.mean[0] - 0.5) < 0.01


def test_imagefolder_statistics_are_read_once_per_process_until_a_file_changes(tmp_path, monkeypatch):
    """The test split and every evaluation load the training split's statistics: from memory, unless a sampled file
    changed since (its size or modification time)."""
    fabricate.make_imagefolder(tmp_path, n_per_class=3, classes=2, size=8, grey=True)
    opened, real_open = [], registry.open_image
    monkeypatch.setattr(registry, "open_image", lambda path: opened.append(path) or real_open(path))
    train = registry.load("imagefolder", "train", str(tmp_path))
    assert len(opened) == 2 * 6  # a header pass and a decode pass over the 6 training files
    test = registry.load("imagefolder", "test", str(tmp_path))
    again = registry.load("imagefolder", "train", str(tmp_path))
    assert len(opened) == 12 and test.mean == train.mean == again.mean and test.std == train.std
    from PIL import Image

    Image.new("L", (8, 8), 255).save(train.files[0])  # whiter, and another size on disk
    changed = registry.load("imagefolder", "test", str(tmp_path))
    assert len(opened) == 24 and changed.mean[0] > train.mean[0]
    # Replaced with its modification time set back (rsync -t, tar x): the inode and its change time still move.
    before = os.stat(train.files[1])
    Image.new("L", (8, 8), 255).save(tmp_path / "white.png")
    os.replace(tmp_path / "white.png", train.files[1])
    os.utime(train.files[1], ns=(before.st_atime_ns, before.st_mtime_ns))
    again = registry.load("imagefolder", "train", str(tmp_path))
    assert len(opened) == 36 and again.mean[0] > changed.mean[0]


def test_imagefolder_statistics_decode_a_large_jpeg_reduced(tmp_path, monkeypatch):
    """A photograph's histogram from libjpeg's 1/2, 1/4 or 1/8 decode while its shorter side stays at 256 or more;
    the nominal size is the stored one. The mean barely moves (an area average); small images decode whole."""
    from PIL import Image

    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 256, (24, 32, 3)), np.ones((32, 32, 1))).astype(np.uint8)  # 768 x 1024
    files = {"a/big.jpg": smooth, "b/big.jpg": smooth, "b/small.jpg": smooth[:200, :300]}
    for name, pixels in files.items():
        (tmp_path / "train" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(tmp_path / "train" / name, quality=95)
    reductions, real_decode = [], registry.decode
    monkeypatch.setattr(registry, "decode", lambda image, mode, reduction=1: (reductions.append(
        (min(image.size), reduction)), real_decode(image, mode, reduction))[1])
    data = registry.load("imagefolder", "train", str(tmp_path))
    assert sorted(reductions) == [(200, 1), (768, 2), (768, 2)]  # 768 / 2 = 384 >= 256 > 768 / 4
    assert data.image_size == 768 and data.channels == 3  # the median of 200, 768, 768: stored sizes
    decoded = []
    for name in files:
        with Image.open(tmp_path / "train" / name) as image:
            decoded.append(np.asarray(image.convert("RGB")).reshape(-1, 3) / 255)
    whole = np.concatenate(decoded)
    np.testing.assert_allclose(data.mean, whole.mean(0), atol=0.01)


def test_imagefolder_train_classes_without_images(tmp_path):
    fabricate.make_imagefolder(tmp_path, n_per_class=1, classes=2)
    for png in (tmp_path / "train").rglob("*.png"):
        png.unlink()
    assert str(tmp_path / "train") in data_error(registry.load, "imagefolder", "test", str(tmp_path))


# ---- the fabricated files are the real formats: torchvision's own readers agree ------------------------------------

def _no_checksums(cls):
    """torchvision dataset class with the md5 sums of the real files dropped (fabricated files have others)."""
    attrs = {key: [[name, None] for name, _ in getattr(cls, key)]
             for key in ("train_list", "test_list") if hasattr(cls, key)}
    if isinstance(getattr(cls, "meta", None), dict):
        attrs["meta"] = {**cls.meta, "md5": None}
    return type(f"Unchecked{cls.__name__}", (cls,), attrs)


def test_torchvision_reads_fabricated_cifar_and_stl10(cifar10_root, cifar100_root, stl10_root):
    from torchvision import datasets

    cifar10 = _no_checksums(datasets.CIFAR10)(str(cifar10_root), train=True)
    ours = registry.load("cifar10", "train", str(cifar10_root))
    np.testing.assert_array_equal(cifar10.data, ours.images.permute(0, 2, 3, 1).numpy())  # torchvision keeps NHWC
    assert cifar10.targets == ours.labels.tolist() and cifar10.classes == fabricate.CIFAR10_CLASSES
    cifar100 = _no_checksums(datasets.CIFAR100)(str(cifar100_root), train=False)
    ours = registry.load("cifar100", "test", str(cifar100_root))
    np.testing.assert_array_equal(cifar100.data, ours.images.permute(0, 2, 3, 1).numpy())
    assert cifar100.targets == ours.labels.tolist()
    for split in ("train", "train+unlabeled"):
        stl = _no_checksums(datasets.STL10)(str(stl10_root), split=split)
        ours = registry.load("stl10", split, str(stl10_root))
        np.testing.assert_array_equal(stl.data, ours.images.numpy())
        np.testing.assert_array_equal(stl.labels, ours.labels.numpy())
    assert stl.classes == fabricate.STL10_CLASSES



@pytest.mark.parametrize("name", ["fashion_mnist", "cifar10", "cifar100", "stl10"])
def test_fetcher_passes_the_users_download_flag_to_torchvision(tmp_path, name):
    """Without the flag torchvision only looks for the files, and stops on their absence without any download."""
    with pytest.raises(RuntimeError, match="not found|download=True"):
        registry.DATASETS[name].fetcher.fetch(tmp_path, download=False)
    assert not any(tmp_path.rglob("*.gz")) and not any(tmp_path.rglob("*.tar.gz"))


def test_imagefolder_16_bit_grey_files_scale_to_8_bits(tmp_path):
    """16-bit grey PNGs (Pillow mode I;16) and PGMs (mode I) keep their grey levels, value v becoming the nearest of
    256 levels, round(v / 257), where PIL's convert("L") would make every value above 255 white."""
    from PIL import Image

    rng = np.random.default_rng(0)
    written = {}
    for split in ("train", "val"):
        for label in ("a", "b"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            values = rng.integers(0, 65536, (6, 6)).astype(np.uint16)
            values[0, :3] = (0, 65535, 200 * 257)  # black, white, and an 8-bit level stored in 16 bits
            for suffix in (".png", ".pgm"):
                Image.fromarray(values).save(folder / f"0{suffix}")
                written[str(folder / f"0{suffix}")] = values
    # Both of Pillow's 16-bit grey modes: older versions open a 16-bit PNG as "I", as this one opens a PGM.
    assert {Image.open(tmp_path / "train" / "a" / name).mode for name in ("0.png", "0.pgm")} in ({"I;16", "I"}, {"I"})
    ds = registry.load("imagefolder", "train", str(tmp_path))
    assert ds.channels == 1
    expected = np.stack([np.rint(written[f] / 257) for f in ds.files])
    views = centre_views(ds, 6)[:, 0].numpy()
    np.testing.assert_array_equal(views, expected)
    assert views[:, 0, :3].tolist() == [[0, 255, 200]] * len(ds.files)
    assert ds.mean[0] == pytest.approx(expected.mean() / 255, abs=1e-4)


def test_imagefolder_float_images_are_refused_with_one_line(tmp_path):
    """A 32-bit float image (mode F) has no range that says which value is white: refused, naming the file, when
    the statistics sample reads it and when a loader meets it later."""
    from PIL import Image

    fabricate.make_imagefolder(tmp_path, n_per_class=2, classes=2, size=8)
    floats = Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32))
    floats.save(tmp_path / "float.tif")
    train_file = tmp_path / "train" / "class_a" / "0000.png"
    png = train_file.read_bytes()
    train_file.write_bytes((tmp_path / "float.tif").read_bytes())  # a TIFF under a .png name: PIL reads the content
    message = data_error(registry.load, "imagefolder", "train", str(tmp_path))
    assert str(train_file) in message and "'F'" in message
    train_file.write_bytes(png)
    ds = registry.load("imagefolder", "test", str(tmp_path))  # the statistics read training files only
    ds.files[3] = str(tmp_path / "float.tif")
    for workers in (0, 1):  # a worker process hands the message over whole, not inside its traceback
        message = data_error(lambda: list(loader.sequential(ds, torch.arange(len(ds)), 5, workers=workers,
                                                            view=EvalView.of(8))))
        assert ds.files[3] in message and "'F'" in message


def test_imagefolder_lists_a_folder_reached_through_a_link_loop_once(tmp_path):
    """Links are followed (torchvision's ImageFolder does), each real folder once: a link back to the class folder
    adds nothing, a link to a folder elsewhere adds its images."""
    fabricate.make_imagefolder(tmp_path / "data", n_per_class=2, classes=2, size=8)
    class_a = tmp_path / "data" / "train" / "class_a"
    (class_a / "inner").mkdir()
    elsewhere = fabricate.make_imagefolder(tmp_path / "elsewhere", n_per_class=1, classes=1, size=8)
    (class_a / "inner" / "loop").symlink_to(class_a, target_is_directory=True)
    (class_a / "inner" / "more").symlink_to(elsewhere / "train" / "class_a", target_is_directory=True)
    ds = registry.load("imagefolder", "train", str(tmp_path / "data"))
    real = [os.path.realpath(f) for f in ds.files]
    images = [*(tmp_path / "data" / "train").rglob("*.png"), elsewhere / "train" / "class_a" / "0000.png"]
    assert len(set(real)) == len(real) == 5
    assert sorted(real) == sorted(str(image.resolve()) for image in images)
    assert ds.labels.tolist() == [0, 0, 0, 1, 1]


def test_imagefolder_lists_files_in_torchvisions_order(tmp_path):
    """torchvision sorts the folders' paths as strings: a-b/ and a.b/ before a/x/, which a walk visits after a/."""
    from PIL import Image
    from torchvision.datasets import ImageFolder

    nested = ["0.png", "A/1.png", "a/2.png", "a/x/3.png", "a-b/4.png", "a.b/5.png", "a b/6.png", "a/.JPG.png"]
    for split in ("train", "val"):
        for number, name in enumerate([f"c1/{rel}" for rel in nested] + ["c2/7.png", "c2/z/8.png"]):
            (tmp_path / split / name).parent.mkdir(parents=True, exist_ok=True)
            Image.new("L", (4, 4), number).save(tmp_path / split / name)
    torchvision_order = ImageFolder(str(tmp_path / "val")).samples
    ds = registry.load("imagefolder", "test", str(tmp_path))
    # (less the hidden file a/.JPG.png, which torchvision reads)
    assert list(zip(ds.files, ds.labels.tolist())) == [(path, label) for path, label in torchvision_order
                                                       if not path.endswith("/.JPG.png")]
    assert centre_views(ds, 4)[:, 0, 0, 0].tolist() == [0, 1, 2, 6, 4, 5, 3, 8, 9]


def test_imagefolder_leaves_out_files_named_only_by_an_extension_as_hidden_files(tmp_path, capsys):
    """".png" and ".JPG" are hidden files, left out with a note where torchvision reads them (as it reads macOS's
    ._NAME metadata files); a name that only ends in an extension, x.JPG, is an image."""
    from PIL import Image

    for split in ("train", "val"):
        for number, name in enumerate(["c1/.png", "c1/.JPG", "c1/x.JPG", "c1/notes.txt", "c2/.jpeg", "c2/y.png"]):
            (tmp_path / split / name).parent.mkdir(parents=True, exist_ok=True)
            if name.endswith(".txt"):
                (tmp_path / split / name).write_text("not an image")
            else:
                Image.new("L", (4, 4), number).save(tmp_path / split / name, format="PNG")
    capsys.readouterr()
    ds = registry.load("imagefolder", "test", str(tmp_path))
    assert list(zip(ds.files, ds.labels.tolist())) == [(str(tmp_path / "val" / "c1" / "x.JPG"), 0),
                                                       (str(tmp_path / "val" / "c2" / "y.png"), 1)]
    assert (f"note: 3 hidden folder(s) or image file(s) inside the class folders of {str(tmp_path / 'val')!r} left "
            f"out (names starting with '.', first: c1/.JPG)") in capsys.readouterr().out


def test_images_in_formats_not_read_are_named_in_a_note(tmp_path, capsys):
    """GIFs and .jfif files beside PNGs were left out without a word (as torchvision's ImageFolder leaves them)."""
    from PIL import Image

    for split in ("train", "val"):
        for number, name in enumerate(["c1/a.png", "c1/b.gif", "c1/c.JFIF", "c2/d.png", "c2/e.gif"]):
            (tmp_path / split / name).parent.mkdir(parents=True, exist_ok=True)
            Image.new("L", (4, 4), number).save(tmp_path / split / name, format="PNG")
    capsys.readouterr()
    ds = registry.load("imagefolder", "train", str(tmp_path))
    assert ds.files == [str(tmp_path / "train" / "c1" / "a.png"), str(tmp_path / "train" / "c2" / "d.png")]
    assert capsys.readouterr().out == "".join(  # (both splits listed at every load)
        f"note: 3 image file(s) inside the class folders of {str(tmp_path / split)!r} in formats not read (.gif "
        f".jfif; first: c1/b.gif) left out: convert them to .bmp/.jpeg/.jpg/.pgm/.png/.ppm/.tif/.tiff/.webp to use "
        f"them\n"
        for split in ("train", "val"))
