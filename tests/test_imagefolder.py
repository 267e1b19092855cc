"""Image folders (data/files.py, data/loader.py): crops cut by the workers from each image at its own size against
torchvision's PIL functions, the crop-size distribution against torchvision's sampler, the test view, the JPEG
draft, 2 processes against 1, resume in the middle of an epoch, and unreadable files."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torchvision.transforms.functional as TF
from PIL import Image
from scipy import stats
from torchvision.transforms import InterpolationMode, RandomResizedCrop

import fabricate
from clusterlab import checkpoint
from clusterlab.data import files, loader, registry
from clusterlab.data.augment import (ColorSpec, CropSpec, EvalView, MultiCrop, crop_boxes, draw_crop_uniforms)
from clusterlab.data.loader import GlobalBatches, iterate, sequential
from clusterlab.config import read_run_config
from clusterlab.errors import ConfigError, DataError
from clusterlab.methods import base as method_base
from conftest import PYTHON, ROOT, TINY, assert_ok, assert_user_error, entry_module, run_script, script_env
from dist_utils import run_distributed, single_thread  # noqa: F401 - single_thread: autouse fixture
from test_resume import HELD_STEP, assert_same_tensors, stop_after_first_step

CROPS = [CropSpec(2, 16, 0.3, 1.0), CropSpec(2, 8, 0.05, 0.3)]


def pipeline(mean=(0.5, 0.5, 0.5), seed=3) -> MultiCrop:
    return MultiCrop(CROPS, ColorSpec(blur_p=0.5), mean, (0.25,) * len(mean), 24, seed)


def pil_image(path, channels=3) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("L" if channels == 1 else "RGB")


def as_array(image) -> np.ndarray:
    array = np.asarray(image)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


# ---- what a worker cuts ----------------------------------------------------------------------------------------------

def test_the_workers_list_of_files_holds_each_name_once_at_its_own_length():
    """Every path comes back as given (a name that is not UTF-8 included), and one long path does not widen the
    others: a fixed-width array took the longest name's width for every file (640 MB for 1.28 M files)."""
    names = ["/data/train/a/1.JPEG", "/d/" + "x" * 500 + ".png", "", os.fsdecode(b"/data/b/caf\xe9.jpg"),
             "/data/b/\u00e9t\u00e9.png"] + [f"/data/c/{i}.png" for i in range(1000)]
    source = files.FileSource(names, torch.zeros(len(names)), 3)
    assert len(source) == len(names) and [source.path(i) for i in range(len(names))] == names
    held = source._path_bytes.nbytes + source._path_ends.nbytes
    assert held == sum(len(os.fsencode(name)) for name in names) + 8 * len(names)
    assert len(files.FileSource([], torch.zeros(0), 3)) == 0


def test_worker_crops_are_torchvision_crops_of_each_whole_image(tmp_path, monkeypatch):
    """Also: the worker opens each file once, a few at a time (here 5, so the batch spans several such chunks)."""
    fabricate.make_mixed_imagefolder(tmp_path, n_per_class=6, jpeg=False)  # PNG: decoded whole, never drafted
    data = registry.load("imagefolder", "train", str(tmp_path))
    source = files.FileSource(data.files, data.labels, data.channels)
    specs = tuple(MultiCrop(CROPS, ColorSpec(), (0.5,) * 3, (0.5,) * 3, 24, 0).each_crop)
    n = len(data)
    uniforms = torch.stack([draw_crop_uniforms(n, torch.Generator().manual_seed(c)) for c in range(4)], dim=1)
    opened, open_image = [], files.open_image
    monkeypatch.setattr(files, "open_image", lambda path: opened.append(path) or open_image(path))
    monkeypatch.setattr(files, "OPEN_AT_ONCE", 5)
    result = source[files.CropJob(0, np.arange(n), uniforms.numpy(), specs)]
    assert n % 5 and sorted(opened) == sorted(map(str, data.files))
    assert result["bad"] == [] and torch.equal(result["labels"], data.labels)
    sizes = {tuple(pil_image(f).size[::-1]) for f in data.files}
    assert len(sizes) > 5  # the folder really has images of many sizes
    for i, path in enumerate(data.files):
        image = pil_image(path)
        height, width = image.height, image.width
        assert result["sizes"][i].tolist() == [height, width]
        for c, spec in enumerate(specs):
            box = result["boxes"][i, c]
            # The box is torchvision's rule applied to this image's own size, and lies inside the image.
            expected = crop_boxes(uniforms[i, c][None], height, width, (spec.min_scale, spec.max_scale))[0]
            assert torch.equal(box, expected)
            top, left, h, w = box.tolist()
            assert 0 <= top and 0 <= left and h >= 1 and w >= 1 and top + h <= height and left + w <= width
            reference = TF.resized_crop(image, top, left, h, w, [spec.size, spec.size], InterpolationMode.BILINEAR)
            np.testing.assert_array_equal(result["crops"][c][i].numpy(), as_array(reference))


def test_boxes_of_a_training_epoch_lie_inside_their_images(tmp_path):
    fabricate.make_mixed_imagefolder(tmp_path, n_per_class=8)
    data = registry.load("imagefolder", "train", str(tmp_path))
    sizes = {i: pil_image(f).size[::-1] for i, f in enumerate(data.files)}
    seen = 0
    for _, cut, _, indices, _, _ in iterate(data, GlobalBatches(len(data), 4, 1, 0, seed=1), 0, augment=pipeline()):
        for params in cut.params:
            for index, (top, left, h, w) in zip(indices.tolist(), params.boxes.tolist()):
                height, width = sizes[index]
                assert 0 <= top and 0 <= left and h >= 1 and w >= 1 and top + h <= height and left + w <= width
                seen += 1
    assert seen == 16 * 4


@pytest.mark.parametrize("size_crops, expected", [([0, 96], 128), ([96, 0], 128), ([0, 160], 160), ([96, 64], 96)])
def test_default_test_view_is_the_largest_training_crop(size_crops, expected):
    """A 0 among --size_crops is the images' size (128 here) wherever it stands (the second place was not read)."""
    assert method_base.test_view_size(0, size_crops, 128) == expected
    assert method_base.test_view_size(112, size_crops, 128) == 112


def test_test_view_is_torchvision_resize_then_centre_crop(tmp_path):
    fabricate.make_mixed_imagefolder(tmp_path, n_per_class=5, jpeg=False)
    data = registry.load("imagefolder", "test", str(tmp_path))
    view = EvalView.of(12, 16)
    batches = list(sequential(data, torch.arange(len(data)), 3, view=view))
    views = torch.cat([b for b, _ in batches])
    for i, path in enumerate(data.files):
        reference = TF.center_crop(TF.resize(pil_image(path), 16, InterpolationMode.BILINEAR), 12)
        np.testing.assert_array_equal(views[i].numpy(), as_array(reference))
    with pytest.raises(Exception, match="--eval_resize 10"):
        EvalView.of(12, 10)


def smooth_jpeg(path, width=400, height=300):
    """A photograph-like JPEG: smooth gradients and a few soft shapes, quality 90."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    image = np.stack([128 + 100 * np.sin(x / 37.0), 128 + 90 * np.cos(y / 23.0), 255 * x / width], axis=-1)
    image += 60 * np.exp(-((x - 150) ** 2 + (y - 120) ** 2) / 900.0)[..., None]
    Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def test_jpeg_draft_keeps_what_each_crop_shows(tmp_path):
    assert [files.draft_reduction(r) for r in (0.5, 1.9, 2.0, 3.99, 4.0, 7.5, 8.0, 100.0)] == [1, 1, 2, 2, 4, 4, 8, 8]
    path = tmp_path / "photo.jpg"
    smooth_jpeg(path)
    with files.open_image(str(path)) as image:
        reduced, applied = files.decode(image, "RGB", 4)
    assert applied == 4 and reduced.size == (100, 75)
    with files.open_image(str(tmp_path / "photo.jpg")) as image:
        whole, applied = files.decode(image, "RGB", 1)
    assert applied == 1 and whole.size == (400, 300)
    Image.open(path).save(tmp_path / "photo.png")
    with files.open_image(str(tmp_path / "photo.png")) as image:
        assert files.decode(image, "RGB", 4)[1] == 1  # no draft outside JPEG
    # 24-pixel crops of boxes of at least 130 pixels: drafted at 1/4; the same regions as from the whole decode.
    source = files.FileSource([str(path)] * 20, torch.zeros(20), 3)
    spec = CropSpec(1, 24, 0.3, 1.0)
    uniforms = draw_crop_uniforms(20, torch.Generator().manual_seed(0))
    result = source[files.CropJob(0, np.arange(20), uniforms[:, None].numpy(), (spec,))]
    differences = []
    for row, (top, left, h, w) in enumerate(result["boxes"][:, 0].tolist()):
        assert files.draft_reduction(min(h, w) / 24) >= 2
        full = files.resized_region(whole, (left, top, left + w, top + h), 24)
        differences.append(np.abs(result["crops"][0][row].numpy().astype(int) - as_array(full)).mean())
    assert max(differences) < 3.0, differences


# ---- the crop-size distribution ----------------------------------------------------------------------------------

@pytest.mark.parametrize("height,width,scale", [(375, 500, (0.14, 1.0)), (500, 333, (0.08, 1.0)),
                                                (300, 300, (0.05, 0.14))])
def test_crop_area_fractions_follow_torchvision(height, width, scale):
    n = 4000
    ours = crop_boxes(draw_crop_uniforms(n, torch.Generator().manual_seed(0)), height, width, scale)
    ours_fraction = (ours[:, 2] * ours[:, 3]).double().numpy() / (height * width)
    torch.manual_seed(0)
    theirs = np.array([RandomResizedCrop.get_params(torch.empty(1, height, width), list(scale), [3 / 4, 4 / 3])
                       for _ in range(n)], dtype=np.float64)
    theirs_fraction = theirs[:, 2] * theirs[:, 3] / (height * width)
    assert stats.ks_2samp(ours_fraction, theirs_fraction).pvalue > 0.01
    aspect = ours[:, 3].double() / ours[:, 2].double()
    assert stats.ks_2samp(aspect.numpy(), theirs[:, 3] / theirs[:, 2]).pvalue > 0.01
    if scale[1] < 0.5:  # every attempt fits: the fraction is U(scale) up to the rounding of h and w
        assert stats.kstest(ours_fraction, "uniform", args=(scale[0], scale[1] - scale[0])).pvalue > 0.01
    else:  # a drift of the sampler (e.g. an area not scaled by the image) would move the mean far from theirs
        assert abs(ours_fraction.mean() - theirs_fraction.mean()) < 0.02


# ---- 2 processes == 1 ----------------------------------------------------------------------------------------------

def _epoch_outputs(data, world_size, rank, workers=0) -> dict:
    """Every step of epoch 1 on this rank: the indices, the workers' uint8 crops and the augmented crops."""
    augment = pipeline(data.mean)
    batches = GlobalBatches(len(data), 6, world_size, rank, seed=4, drop_last=False)
    out = {"indices": [], "labels": [], "cut": [], "crops": [], "state": None}
    for epoch in (0, 1):
        for _, cut, labels, indices, total, offset in iterate(data, batches, epoch, workers=workers,
                                                              augment=augment):
            crops = augment(cut, total, offset)
            if epoch == 1:
                out["indices"].append(indices)
                out["labels"].append(labels)
                out["cut"].append(cut.crops)
                out["crops"].append(crops)
    out["state"] = augment.generator.get_state()
    return out


def _two_process_worker(rank, world, root):
    return _epoch_outputs(registry.load("imagefolder", "train", root), world, rank, workers=1)


def test_two_processes_cut_the_crops_of_one(tmp_path):
    fabricate.make_mixed_imagefolder(tmp_path, n_per_class=8, classes=2)  # 16 images, grey and colour, PNG + JPEG
    data = registry.load("imagefolder", "train", str(tmp_path))
    assert data.channels == 3
    single = _epoch_outputs(data, 1, 0)
    ranks = run_distributed(_two_process_worker, 2, str(tmp_path))
    assert len(single["indices"]) == 3  # 16 samples in global batches of 6: the last one has 4
    for step in range(3):
        assert torch.equal(torch.cat([r["indices"][step] for r in ranks]), single["indices"][step])
        assert torch.equal(torch.cat([r["labels"][step] for r in ranks]), single["labels"][step])
        for crop in range(4):
            assert torch.equal(torch.cat([r["cut"][step][crop] for r in ranks]), single["cut"][step][crop])
            torch.testing.assert_close(torch.cat([r["crops"][step][crop] for r in ranks]),
                                       single["crops"][step][crop], atol=1e-6, rtol=0)
    assert all(torch.equal(r["state"], single["state"]) for r in ranks)


# ---- resume ------------------------------------------------------------------------------------------------------

def test_resumed_iteration_continues_with_the_same_crops(tmp_path):
    fabricate.make_mixed_imagefolder(tmp_path, n_per_class=10)
    data = registry.load("imagefolder", "train", str(tmp_path))
    batches = GlobalBatches(len(data), 4, 1, 0, seed=2)
    whole = pipeline()
    expected = [whole(cut, total, offset) for _, cut, _, _, total, offset in
                iterate(data, batches, 0, workers=2, augment=whole)]
    first = pipeline()
    for step, cut, _, _, total, offset in iterate(data, batches, 0, workers=2, augment=first):
        first(cut, total, offset)
        if step == 1:
            break  # stopped after step 1: the checkpoint holds the generator as it is now
    resumed = pipeline(seed=99)
    resumed.load_state_dict(first.state_dict())
    rows = list(iterate(data, batches, 0, start_step=2, workers=2, augment=resumed))
    assert [row[0] for row in rows] == list(range(2, len(batches)))
    for (_, cut, _, _, total, offset), want in zip(rows, expected[2:]):
        for a, b in zip(resumed(cut, total, offset), want):
            assert torch.equal(a, b)
    assert torch.equal(resumed.generator.get_state(), whole.generator.get_state())


def test_training_on_an_image_folder_stopped_mid_epoch_resumes_bit_identical_and_evaluates(tmp_path):
    fabricate.make_mixed_imagefolder(tmp_path / "data", n_per_class=12, classes=2)
    run = [*TINY, "--dataset", "imagefolder", "--data_path", tmp_path / "data", "--batch_size", "4",
           "--nmb_crops", "2", "1", "--size_crops", "12", "8", "--min_scale_crops", "0.3", "0.1",
           "--max_scale_crops", "1", "0.3", "--workers", "2", "--log_every", "1", "--freeze_prototypes_niters", "2"]
    reference = tmp_path / "reference"
    assert_ok(run_script("main_pretrain.py", *run, "--output_dir", reference))
    stopped_dir = tmp_path / "stopped"
    # SIGTERM to every process, loader workers included, as Slurm stops a step (torch's workers would die of it).
    stopped, steps = stop_after_first_step(stopped_dir, signal.SIGTERM, [*run, "--output_dir", stopped_dir],
                                           to_group=True)
    assert stopped.returncode == 75, stopped.stderr
    status = json.loads((stopped_dir / "status.json").read_text())
    assert status["epoch"] == 0 and 0 < status["step"] <= HELD_STEP + 1, status  # of 6 steps
    assert_ok(run_script("main_pretrain.py", *run, "--output_dir", stopped_dir))
    ours, theirs = (checkpoint.load(d / "checkpoint.pth") for d in (stopped_dir, reference))
    for key in ("model", "optimizer", "method_state", "method_random", "rng", "epoch", "step", "global_step"):
        assert_same_tensors(ours[key], theirs[key], key)
    # The evaluation's view (resize then centre crop of the 12-pixel training crop) is in its record's protocol.
    knn = ["eval_knn.py", "--run", reference, "--k", "5", "--eval_resize", "14"]
    scored = run_script(*knn)
    assert_ok(scored)
    assert "train features recomputed, 14 px, centre 12 px) on" in scored.stdout  # the view, also on its line
    (record,) = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert record["protocol"]["eval_resize"] == 14 and record["protocol"]["eval_crop"] == 12
    # --skip_recorded takes that record while the folder holds the images it was measured on, and not once one of
    # them is gone (it skipped then, and the table kept the number of the folder as it was)
    skipped = run_script(*knn, "--skip_recorded", "true")
    assert_ok(skipped)
    assert "already recorded" in skipped.stdout
    sorted((tmp_path / "data" / "val").glob("*/*"))[0].unlink()
    evaluated = run_script(*knn, "--skip_recorded", "true")
    assert_ok(evaluated)
    assert "already recorded" not in evaluated.stdout
    scored = [json.loads(line)["protocol"]["scored_images"] for line in (reference / "metrics.jsonl").open()]
    assert scored == [scored[0], scored[0] - 1]


FAIL_AT_STEP_2 = """
import multiprocessing, runpy, sys
from clusterlab import engine
multiprocessing.set_start_method(sys.argv.pop(1))
original = engine.Trainer.step
def step(self, batch, progress):
    if progress.step == 2:
        raise RuntimeError("a failure in the middle of an epoch")
    return original(self, batch, progress)
engine.Trainer.step = step
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("start_method", ["fork", "forkserver"])
def test_a_run_whose_loader_workers_ignore_slurms_signals_still_exits_on_a_failure(tmp_path, start_method):
    """The workers ignore a SIGTERM that is not their main process's; Python's exit stops them with one (they are
    daemon processes), and waits for them: a worker that ignored that one too would hold the failed run forever.
    A forkserver (Python 3.14's default), not the main process, is the parent of the workers it starts."""
    fabricate.make_mixed_imagefolder(tmp_path / "data", n_per_class=12, classes=2)
    run = [*TINY, "--dataset", "imagefolder", "--data_path", tmp_path / "data", "--batch_size", "4", "--size_crops",
           "12", "--workers", "2", "--output_dir", tmp_path / "run"]
    process = subprocess.Popen([PYTHON, "-c", FAIL_AT_STEP_2, start_method, str(ROOT / "main_pretrain.py"),
                                *map(str, run)],
                               cwd=ROOT, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 1 and "a failure in the middle of an epoch" in stderr
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "failed"


# Loader workers whose worker_init_fn takes its time (the window in which torch's SIGTERM handler is in place), and
# SIGTERM to the whole process group right after they were started, as Slurm sends it to every process of a job.
SIGTERM_WHILE_WORKERS_START = """
import functools, os, subprocess, sys, time
import torch
from clusterlab import signals
from clusterlab.data import loader

def slow_init(main_pid, worker_id):
    time.sleep(1.0)
    loader._ignore_stop_signals(main_pid, worker_id)

if __name__ == "__main__":
    torch.multiprocessing.set_start_method(sys.argv[2])
    signals.install()
    signals.defer()  # as during training: the signal is remembered, acted on at the next step
    images = torch.utils.data.DataLoader(list(range(8)), batch_size=2, num_workers=2,
                                         worker_init_fn=functools.partial(slow_init, os.getpid()))
    batches = loader.started(images) if sys.argv[1] == "started" else iter(images)
    subprocess.run(["kill", "-TERM", "--", f"-{os.getpgrp()}"])  # from another process, as slurmstepd sends it
    print(sum(len(batch) for batch in batches), signals.name())
"""


@pytest.mark.parametrize("start, start_method", [("started", "fork"), ("started", "forkserver"), ("iter", "fork")])
def test_loader_workers_started_by_the_loader_outlive_a_sigterm_to_every_process(tmp_path, start, start_method):
    """`loader.started` starts them with the stop signals blocked: every batch comes, and this process takes the
    signal (the run then saves and exits 75). A plain iter() is the failure it replaced: torch's handler kills a
    worker that has not reached its worker_init_fn, and the run failed. A forkserver (Python 3.14's default) forks
    the workers from a server of its own."""
    script = tmp_path / "sigterm_while_workers_start.py"  # a file: a forkserver's workers import its functions
    script.write_text(SIGTERM_WHILE_WORKERS_START)
    result = subprocess.run([PYTHON, str(script), start, start_method], cwd=ROOT,
                            env=script_env(), capture_output=True, text=True, timeout=120, start_new_session=True)
    if start == "started":
        assert result.returncode == 0 and result.stdout.split() == ["8", "SIGTERM"], result.stderr
    else:
        assert result.returncode == 1 and "is killed by signal: Terminated" in result.stderr


def test_the_knn_monitor_decodes_with_the_runs_loader_workers(tmp_path, monkeypatch):
    """--knn_monitor_every on an image folder: the test split (and, for SwAV, the recomputed train split) decoded
    by --workers processes, as training is (it decoded them in the main process, serially)."""
    fabricate.make_imagefolder(tmp_path / "data", n_per_class=4, classes=2, size=8)
    passes, real_sequential = [], loader.sequential

    def recording(images, indices, batch_size, workers=0, *args, **kwargs):
        passes.append((images.split, workers))
        return real_sequential(images, indices, batch_size, workers, *args, **kwargs)

    monkeypatch.setattr(loader, "sequential", recording)
    entry_module("main_pretrain").main([str(arg) for arg in (
        *TINY, "--dataset", "imagefolder", "--data_path", tmp_path / "data", "--batch_size", "4", "--size_crops", "8",
        "--epochs", "1", "--workers", "2", "--knn_monitor_every", "1", "--output_dir", tmp_path / "run")])
    assert sorted(set(passes)) == [("test", 2), ("train", 2)]


def test_an_image_folder_trains_with_crops_of_48_px_on_the_cpu(tmp_path):
    """The loader's crops are channels-last views of the workers' (n, size, size, C) arrays: with such inputs torch
    2.14.1's convolution backward on the CPU died with a segmentation fault from 48 px crops on, at the first
    backward pass (here 8 px images cut into 48 px crops), and so did every image-folder training with larger crops.
    augment.apply_cut now copies them into torch's default layout."""
    fabricate.make_imagefolder(tmp_path / "data", n_per_class=8, classes=2, size=8)
    assert_ok(run_script("main_pretrain.py", *TINY, "--dataset", "imagefolder", "--data_path", tmp_path / "data",
                         "--batch_size", "16", "--size_crops", "48", "--epochs", "1", "--output_dir", tmp_path / "run"))


def test_resuming_on_a_changed_image_folder_is_refused_and_on_a_moved_one_continues(tmp_path):
    """A checkpoint keeps a digest of its training set (files below the folder, labels, in order): a file renamed
    since would give its position to another image under a memory bank or pseudo-labels, so the resume is refused on
    one line and nothing is written; the same files in another place resume."""
    fabricate.make_imagefolder(tmp_path / "data", n_per_class=6, classes=2, size=12)
    run = [*TINY, "--dataset", "imagefolder", "--batch_size", "4", "--size_crops", "12", "--epochs", "1"]
    run_dir = tmp_path / "run"
    assert_ok(run_script("main_pretrain.py", *run, "--data_path", tmp_path / "data", "--output_dir", run_dir))
    shutil.copytree(tmp_path / "data", tmp_path / "moved")
    renamed = sorted((tmp_path / "data" / "train").rglob("*.png"))[0]
    renamed.rename(renamed.with_name("zz_" + renamed.name))
    before = sorted((p.name, p.stat().st_mtime_ns) for p in run_dir.iterdir())
    refused = run_script("main_pretrain.py", *run, "--epochs", "2", "--data_path", tmp_path / "data",
                         "--output_dir", run_dir)
    assert_user_error(refused, "main_pretrain.py", "was trained on another training set", "new --output_dir")
    assert sorted((p.name, p.stat().st_mtime_ns) for p in run_dir.iterdir()) == before
    assert_ok(run_script("main_pretrain.py", *run, "--epochs", "2", "--data_path", tmp_path / "moved",
                         "--output_dir", run_dir))
    assert checkpoint.load(run_dir / "checkpoint.pth")["epoch"] == 2
    # A linear probe's checkpoint describes the images it was trained on (--data_path), not the run's: a probe on
    # other training images has a folder of its own (it was refused as a probe of another training set), and a
    # probe folder that does hold one is refused.
    probe = ["eval_linear.py", "--run", run_dir, "--epochs", "1", "--batch_size", "4", "--device", "cpu"]
    assert_ok(run_script(*probe, "--data_path", tmp_path / "data"))
    assert_ok(run_script(*probe))
    own, other = sorted(run_dir.glob("linear_ep*"), key=lambda path: len(path.name))
    assert other.name.startswith(f"{own.name}_data-") and len(other.name) == len(own.name) + len("_data-") + 8
    shutil.rmtree(own)
    other.rename(own)
    assert_user_error(run_script(*probe), "eval_linear.py", "was trained on another training set",
                      "to train the probe afresh")


def test_a_resumed_run_normalises_as_its_checkpoint_did(tmp_path, monkeypatch):
    """An image folder's statistics are computed at every start: a resume goes on with the checkpoint's mean and std
    even where the code that computes them has changed since (here: every statistic moved by 0.1)."""
    fabricate.make_imagefolder(tmp_path / "data", n_per_class=4, classes=2, size=8)
    run = [str(arg) for arg in (*TINY, "--dataset", "imagefolder", "--data_path", tmp_path / "data", "--batch_size",
                                "4", "--output_dir", tmp_path / "run")]
    entry_module("main_pretrain").main([*run, "--epochs", "1"])
    trained_with = checkpoint.load(tmp_path / "run" / "checkpoint.pth")["data_info"]
    computed = registry._folder_statistics

    def moved(files, root):
        channels, size, mean, std = computed(files, root)
        return channels, size, tuple(m + 0.1 for m in mean), tuple(s + 0.1 for s in std)

    monkeypatch.setattr(registry, "_folder_statistics", moved)
    assert registry.load("imagefolder", "train", str(tmp_path / "data")).mean[0] == trained_with["mean"][0] + 0.1
    entry_module("main_pretrain").main([*run, "--epochs", "2"])
    resumed = checkpoint.load(tmp_path / "run" / "checkpoint.pth")
    assert resumed["epoch"] == 2
    assert (resumed["data_info"]["mean"], resumed["data_info"]["std"]) == (trained_with["mean"], trained_with["std"])


def test_the_fingerprint_reads_file_names_that_are_not_utf8(tmp_path):
    fabricate.make_imagefolder(tmp_path, n_per_class=3, classes=2, size=12)
    first = sorted((tmp_path / "train").rglob("*.png"))[0]
    os.rename(os.fsencode(first), os.fsencode(first.parent) + b"/caf\xe9.png")
    images = registry.load("imagefolder", "train", str(tmp_path))
    assert len(images) == 6 and len(images.fingerprint) == 16
    assert images.fingerprint != registry.load("imagefolder", "train", str(tmp_path)).subset(range(5)).fingerprint


# ---- unreadable files --------------------------------------------------------------------------------------------

def test_unreadable_files_are_replaced_by_the_next_readable_one(tmp_path, capsys, monkeypatch):
    fabricate.make_imagefolder(tmp_path, n_per_class=10, classes=2, size=12, grey=False, seed=1)
    images, _ = fabricate.imagefolder_arrays(10, 2, 12, False, seed=1)["train"]
    data = registry.load("imagefolder", "train", str(tmp_path))
    bad = [2, 3, 7, 12]  # 2 and 3 in a row: 2 is replaced by 4
    spoiled = fabricate.spoil_image_files([data.files[i] for i in bad])
    assert sorted(spoiled.values()) == ["corrupt", "not an image", "truncated", "zero-byte"]
    monkeypatch.setattr(loader, "BAD_FILE_LIMIT", 0.5)
    monkeypatch.setattr(files, "OPEN_AT_ONCE", 2)  # batches of 5 opened 2 at a time: substitutes across chunks
    whole = MultiCrop([CropSpec(1, 12, 1.0, 1.0)], ColorSpec(), (0.5,) * 3, (0.5,) * 3, 12, seed=0)
    batches = GlobalBatches(len(data), 5, 1, 0, seed=3)
    log = tmp_path / "train_log.jsonl"
    for epoch in (0, 1):
        for _, cut, labels, indices, _, _ in iterate(data, batches, epoch, augment=whole, log=log):
            for index, label, crop in zip(indices.tolist(), labels.tolist(), cut.crops[0]):
                source = {2: 4, 3: 4, 7: 8, 12: 13}.get(index, index)
                np.testing.assert_array_equal(crop.numpy(), images[source])  # the substitute's pixels
                assert label == index // 10  # the sample keeps its own label
    lines = capsys.readouterr().out.splitlines()
    for i in bad:
        mentions = [line for line in lines if data.files[i] in line]
        assert len(mentions) == 1 and "unreadable image file" in mentions[0]  # once, though met in both epochs
    assert sum("epoch 1: 4 unreadable image file(s)" in line for line in lines) == 1
    assert sum("epoch 2: 4 unreadable image file(s)" in line for line in lines) == 1
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["epoch"], r["bad_files"]) for r in records] == [(0, 4), (1, 4)]
    # Evaluation passes replace them the same way.
    views = torch.cat([b for b, _ in sequential(data, torch.arange(len(data)), 6, view=EvalView.of(12))])
    np.testing.assert_array_equal(views[[2, 3, 7, 12]].numpy(), images[[4, 4, 8, 13]])


def test_too_many_unreadable_files_stop_training_with_one_line(tmp_path):
    fabricate.make_imagefolder(tmp_path, n_per_class=10, classes=2, size=8, grey=True)
    data = registry.load("imagefolder", "train", str(tmp_path))
    fabricate.spoil_image_files([data.files[5]])  # 1 of 20: above 1 % of the epoch
    whole = MultiCrop([CropSpec(1, 8, 1.0, 1.0)], ColorSpec(), (0.5,), (0.5,), 8, seed=0)
    with pytest.raises(DataError) as info:
        list(iterate(data, GlobalBatches(20, 4, 1, 0, seed=0), 0, augment=whole))
    message = str(info.value)
    assert "\n" not in message and "1 unreadable image files in epoch 1" in message and data.files[5] in message


def test_hidden_files_and_folders_are_left_out_with_a_note(tmp_path, capsys):
    """macOS leaves ._NAME beside every NAME it copies onto some disks: named as images, each was read as a corrupt
    one, and training stopped above the 1 % limit. Jupyter's .ipynb_checkpoints/ among the class folders was class 0
    (every real label moved by one), and inside a class it added copies of its images."""
    fabricate.make_imagefolder(tmp_path, n_per_class=10, classes=2, size=8, grey=True)
    before = registry.load("imagefolder", "train", str(tmp_path))
    images = sorted((tmp_path / "train").rglob("*.png"))
    for image in images:
        (image.parent / f"._{image.name}").write_bytes(b"\x00\x05\x16\x07 macOS metadata")
    for split in ("train", "val"):
        shutil.copytree(tmp_path / split / "class_a", tmp_path / split / ".ipynb_checkpoints")
    shutil.copytree(tmp_path / "train" / "class_b", tmp_path / "train" / "class_b" / ".ipynb_checkpoints")
    capsys.readouterr()
    after = registry.load("imagefolder", "train", str(tmp_path))
    assert (after.class_names, after.files, after.labels.tolist()) == (
        before.class_names, before.files, before.labels.tolist())
    notes = capsys.readouterr().out.splitlines()
    assert notes == [f"note: 1 hidden folder(s) or image file(s) in {str(tmp_path / 'train')!r} left out (names "
                     f"starting with '.', first: .ipynb_checkpoints)",
                     f"note: 1 hidden folder(s) or image file(s) in {str(tmp_path / 'val')!r} left out (names "
                     f"starting with '.', first: .ipynb_checkpoints)",
                     f"note: {len(images) + 1} hidden folder(s) or image file(s) inside the class folders of "
                     f"{str(tmp_path / 'train')!r} left out (names starting with '.', first: "
                     f"class_a/._{images[0].name})"]
    # a hidden file no loader would read (macOS's .DS_Store) is left out without a note, as torchvision leaves it
    fabricate.make_imagefolder(tmp_path / "finder", n_per_class=2, classes=2, size=8, grey=True)
    for folder in (tmp_path / "finder" / "train", tmp_path / "finder" / "train" / "class_a"):
        (folder / ".DS_Store").write_bytes(b"Bud1")
    capsys.readouterr()
    assert len(registry.load("imagefolder", "train", str(tmp_path / "finder"))) == 4
    assert capsys.readouterr().out == ""


def test_a_run_whose_first_training_file_is_unreadable_saves_its_checkpoints(tmp_path, capsys):
    """1 of 120 files, within the limit: replaced in every epoch. A check of the weights before each save that read
    the first 8 training files met it under a limit of its own (1 % of 8) and stopped the run at its first save."""
    fabricate.make_imagefolder(tmp_path / "data", n_per_class=60, classes=2, size=8, grey=True)
    first = registry.load("imagefolder", "train", str(tmp_path / "data")).files[0]
    fabricate.spoil_image_files([first])
    result = run_script("main_pretrain.py", *TINY, "--dataset", "imagefolder", "--data_path", tmp_path / "data",
                        "--batch_size", "16", "--epochs", "2", "--output_dir", tmp_path / "run")
    assert_ok(result)
    assert checkpoint.load(tmp_path / "run" / "checkpoint.pth")["epoch"] == 2
    assert result.stdout.count(f"unreadable image file {first} (") == 2  # by the statistics, then by training
    assert "epoch 2: 1 unreadable image file(s) replaced" in result.stdout


def float_image(path) -> None:
    """A readable image of 32-bit float samples (a TIFF under the file's own name): a file no run can use."""
    Image.fromarray(np.zeros((8, 8), dtype=np.float32), mode="F").save(path, format="TIFF")


def _one_rank_meets_an_unusable_file(rank, world, root, spoiled):
    """Each rank's DataError message (or None) from a training epoch, an evaluation pass, the pixel baseline's pass
    and SeLa's labelling pass (training view, synchronised batch norm: one all-reduce per chunk)."""
    from clusterlab.eval.features import extract, pixels
    from clusterlab.methods import DataInfo
    from clusterlab.methods.sela import SeLa
    from clusterlab.models.batchnorm import convert_sync_batchnorm
    from test_sela import sela_args

    data = registry.load("imagefolder", "train", root)
    dist.barrier()  # every rank loads before the file is spoiled: the statistics sample would meet it first
    if rank == 0:
        float_image(data.files[spoiled])
    dist.barrier()
    whole = MultiCrop([CropSpec(1, 8, 1.0, 1.0)], ColorSpec(), (0.5,), (0.5,), 8, seed=0)
    sela = SeLa(sela_args("--label_view", "train", "--label_batch_size", 4, "--hc", 1, "--ncl", 2, "--size_crops", 8),
                DataInfo.of(data), torch.device("cpu"))
    sela.attach_data(data)
    convert_sync_batchnorm(sela, torch.device("cpu"))
    messages = []
    for run in (lambda: list(iterate(data, GlobalBatches(len(data), 4, world, rank, seed=0), 0, augment=whole)),
                lambda: extract(lambda x: x.flatten(1), data, EvalView.of(8), (0.5,), (0.5,), torch.device("cpu"),
                                batch_size=2),
                lambda: pixels(data, EvalView.of(8)),
                lambda: sela.relabel([0])):
        try:
            run()
            messages.append(None)
        except DataError as err:
            messages.append(str(err))
    return messages


def _load_own_copy(rank, world, roots):
    try:
        registry.load("imagefolder", "train", roots[rank])
        return "loaded"
    except DataError as err:
        return str(err)


@pytest.mark.parametrize("change", ["a file missing", "a file renamed"])
def test_ranks_that_list_different_image_folders_are_refused_on_every_rank(tmp_path, change):
    """Each rank lists the folder itself (node-local copies at one path, a stale network-filesystem cache): with one
    file fewer, or as many files under another name, the ranks' batches would come from different images at the same
    positions (or their collectives would pair up wrongly) without a word."""
    fabricate.make_imagefolder(tmp_path / "node0", n_per_class=4, classes=2, size=8, grey=True)
    shutil.copytree(tmp_path / "node0", tmp_path / "node1")
    victim = sorted((tmp_path / "node1" / "train").rglob("*.png"))[-1]
    if change == "a file missing":
        victim.unlink()
    else:
        victim.rename(victim.with_name("renamed.png"))
    roots = [str(tmp_path / "node0"), str(tmp_path / "node1")]
    errors = run_distributed(_load_own_copy, 2, roots)
    assert errors[0].endswith(f"under {roots[0]!r}") and errors[1].endswith(f"under {roots[1]!r}")
    assert errors[0].rsplit(" under ", 1)[0] == errors[1].rsplit(" under ", 1)[0]
    sizes = ("8 images", "7 images") if change == "a file missing" else ("8 images", "8 images")
    assert "split 'train' differs between ranks (rank 0: " + sizes[0] in errors[0]
    assert "; rank 1: " + sizes[1] in errors[0] and "every node must see the same files" in errors[0]
    assert run_distributed(_load_own_copy, 2, [roots[0]] * 2) == ["loaded", "loaded"]


def test_a_file_no_run_can_use_on_one_rank_stops_every_rank(tmp_path):
    """Without the collective check the other rank would wait in its next collective until the process group's
    timeout (here 120 s, 30 minutes in a run) for the one that stopped."""
    fabricate.make_imagefolder(tmp_path, n_per_class=4, classes=2, size=8, grey=True)
    data = registry.load("imagefolder", "train", str(tmp_path))
    # On rank 1 in training (second half of the first global batch) and in evaluation (the second half of the set).
    spoiled = int(GlobalBatches(len(data), 4, 2, 1, seed=0).local_indices(0, 0)[0][0])
    assert spoiled >= 4, "the evaluation's shards: rank 1 holds images 4 to 7"
    ranks = run_distributed(_one_rank_meets_an_unusable_file, 2, str(tmp_path), spoiled)
    elsewhere = "an image file cannot be used (another process's error names it)"
    assert "32-bit samples" in ranks[1][0] and "32-bit samples" in ranks[1][1]
    assert ranks[0][:2] == [elsewhere] * 2
    assert "32-bit samples" in ranks[1][2] and ranks[0][2] == elsewhere  # the baseline's pass is sharded too
    met = ["32-bit samples" in r[3] for r in ranks]  # SeLa's chunks are shuffled: either rank may meet it
    assert sum(met) == 1 and ranks[met.index(False)][3] == elsewhere


def test_evaluation_stops_above_the_unreadable_file_limit(tmp_path):
    from clusterlab.eval.features import extract, pixels

    fabricate.make_imagefolder(tmp_path, n_per_class=10, classes=2, size=8, grey=True)
    data = registry.load("imagefolder", "train", str(tmp_path))
    fabricate.spoil_image_files([data.files[5]])  # 1 of 20: above 1 % of the images scored
    limit = (r"^1 unreadable image files in the train split of imagefolder, more than 1% of its samples \(first: "
             r".*fix or remove them$")
    with pytest.raises(DataError, match=limit):
        extract(lambda x: x.flatten(1), data, EvalView.of(8), (0.5,), (0.5,), torch.device("cpu"))
    with pytest.raises(DataError, match=limit):
        pixels(data, EvalView.of(8))


def _pixels_of_a_folder(rank, world, root):
    from clusterlab.eval.features import pixels

    return pixels(registry.load("imagefolder", "train", root), EvalView.of(8))


def test_the_pixel_baseline_on_two_processes_counts_an_unreadable_file_once(tmp_path, capsys):
    """Each rank reads its share (every rank read the whole set, and the 1 % limit met each bad file once a rank:
    a folder that training accepts stopped the baseline on 2 processes)."""
    from clusterlab.eval.features import pixels

    fabricate.make_imagefolder(tmp_path, n_per_class=50, classes=2, size=8, grey=True)
    spoiled = registry.load("imagefolder", "train", str(tmp_path)).files[70]
    fabricate.spoil_image_files([spoiled])  # 1 of 100: within the limit
    data = registry.load("imagefolder", "train", str(tmp_path))  # as the ranks load it (grey still: the spoiled
    capsys.readouterr()                                           # file's RGB header does not count)
    alone = pixels(data, EvalView.of(8))
    assert alone.shape == (100, 64) and capsys.readouterr().out.count(spoiled) == 1
    for values in run_distributed(_pixels_of_a_folder, 2, str(tmp_path)):
        assert torch.equal(values, alone)


def _features_of_three_images(rank, world, root):
    from clusterlab.eval.features import extract

    data = registry.load("imagefolder", "train", root)
    return extract(lambda x: x.flatten(1), data, EvalView.of(8), (0.5,), (0.5,), torch.device("cpu"))


@pytest.mark.slow
def test_features_of_fewer_images_than_processes_are_gathered_whole(tmp_path):
    """A rank whose share is empty takes part in the gather with an empty batch of rows of the others' width (a
    1-D empty tensor there would make gloo refuse the gather, and NCCL, which does not check, hang or overrun)."""
    from clusterlab.eval.features import extract

    fabricate.make_imagefolder(tmp_path, n_per_class=1, classes=3, size=8, grey=True)
    alone = extract(lambda x: x.flatten(1), registry.load("imagefolder", "train", str(tmp_path)), EvalView.of(8),
                    (0.5,), (0.5,), torch.device("cpu"))
    assert alone.shape == (3, 64)
    for features in run_distributed(_features_of_three_images, 4, str(tmp_path)):
        assert torch.equal(features, alone)


def test_a_folder_of_unreadable_files_is_one_line(tmp_path):
    fabricate.make_imagefolder(tmp_path, n_per_class=2, classes=2, size=8)
    data = registry.load("imagefolder", "train", str(tmp_path))
    fabricate.spoil_image_files(data.files[1:])
    # The statistics leave the unreadable files out (one line each) ...
    assert registry.load("imagefolder", "train", str(tmp_path)).image_size == 8
    fabricate.spoil_image_files(data.files[:1])
    # ... and a sample with no readable file at all is an error of one line.
    with pytest.raises(DataError) as info:
        registry.load("imagefolder", "train", str(tmp_path))
    assert "\n" not in str(info.value) and "none of the 4 files" in str(info.value)
    # The set listed before: every file unreadable, so no substitute exists.
    whole = MultiCrop([CropSpec(1, 8, 1.0, 1.0)], ColorSpec(), (0.5,), (0.5,), 8, seed=0)
    with pytest.raises(DataError) as info:
        list(iterate(data, GlobalBatches(4, 2, 1, 0, seed=0), 0, augment=whole))
    assert "\n" not in str(info.value) and "no readable image" in str(info.value)


def test_class_folders_without_images_or_differing_between_splits(tmp_path):
    fabricate.make_imagefolder(tmp_path, n_per_class=2, classes=3, size=8)
    for png in (tmp_path / "train" / "class_b").iterdir():
        png.unlink()
    with pytest.raises(DataError) as info:
        registry.load("imagefolder", "train", str(tmp_path))
    assert "\n" not in str(info.value) and str(tmp_path / "train" / "class_b") in str(info.value)
    shutil.rmtree(tmp_path / "train" / "class_b")
    for split in ("train", "test"):  # val/ still has class_b: refused before a run starts, not at its first evaluation
        with pytest.raises(DataError) as info:
            registry.load("imagefolder", split, str(tmp_path))
        assert "\n" not in str(info.value) and "extra: 'class_b'" in str(info.value)
    # one class named alike on both sides, but with a decomposed accent in val/ (as macOS writes it)
    shutil.rmtree(tmp_path / "val" / "class_b")
    (tmp_path / "train" / "class_a").rename(tmp_path / "train" / "caf\u00e9")
    (tmp_path / "val" / "class_a").rename(tmp_path / "val" / "cafe\u0301")
    with pytest.raises(DataError,
                       match="'caf\u00e9' spelt in different Unicode forms \\(NFC and NFD\\): rename one side"):
        registry.load("imagefolder", "test", str(tmp_path))


def test_the_cluster_sample_grid_shows_each_clusters_images_read_in_one_pass(tmp_path, monkeypatch):
    """Each row holds images of its cluster, as the test view shows them; the files are read in one pass (each
    image was read by a pass over a loader built for it alone: a minute for 200 images of an ImageNet folder)."""
    import matplotlib.axes

    from clusterlab.eval import plots

    fabricate.make_imagefolder(tmp_path / "data", n_per_class=6, classes=3, size=12, grey=False, seed=2)
    data = registry.load("imagefolder", "train", str(tmp_path / "data"))
    expected = torch.cat([b for b, _ in sequential(data, torch.arange(len(data)), 5, view=EvalView.of(12))])
    shown, passes, read = [], [], loader.sequential
    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", lambda axis, image, **kwargs: shown.append(image))
    monkeypatch.setattr(loader, "sequential", lambda *args, **kwargs: passes.append(1) or read(*args, **kwargs))
    clusters = np.arange(len(data)) % 3
    plots.cluster_samples_png(data, clusters, tmp_path / "samples.png", "t", clusters=3, per_cluster=4)
    assert len(passes) == 1 and len(shown) == 12 and (tmp_path / "samples.png").is_file()
    for number, image in enumerate(shown):
        matches = [i for i in range(len(data)) if np.array_equal(image, expected[i].numpy().transpose(1, 2, 0))]
        assert matches and all(clusters[i] == number // 4 for i in matches)  # rows of equal-sized clusters, in order


def test_names_that_are_not_utf8_reach_the_records_tables_plots_and_messages(tmp_path):
    """A data folder 'd\\xe9mo' and a class folder 'caf\\xe9' (Latin-1 bytes): the confusion plot failed (matplotlib
    refuses the name), the record's folder name stopped collect_results (pandas could not write it), and under a
    strict UTF-8 locale (en_US.UTF-8) the message naming an unreadable file 'caf\\xe9.png' failed training."""
    data = os.fsdecode(bytes(tmp_path) + b"/d\xe9mo")
    fabricate.make_imagefolder(data, n_per_class=6, classes=3, size=12)
    for split in ("train", "val"):
        os.rename(f"{data}/{split}/class_a", os.fsdecode(os.fsencode(f"{data}/{split}/") + b"caf\xe9"))
    baseline = run_script("eval_cluster.py", "--baseline", "pixels", "--dataset", "imagefolder", "--data_path", data,
                          "--output_dir", tmp_path / "runs" / "pixels", "--device", "cpu", "--restarts", "1")
    assert_ok(baseline)
    record = json.loads((tmp_path / "runs" / "pixels" / "metrics.jsonl").read_text())
    assert record["protocol"]["data"] == "d\\xe9mo"
    assert list((tmp_path / "runs" / "pixels").rglob("*confusion*.png"))
    assert_ok(run_script("collect_results.py", "--root", tmp_path / "runs", "--out", tmp_path / "tables",
                         "--plots", "false"))
    assert "d\\xe9mo" in (tmp_path / "tables" / "imagefolder.csv").read_text()

    unreadable = os.fsdecode(os.fsencode(f"{data}/train/class_b/") + b"caf\xe9.png")
    with open(unreadable, "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n")
    strict = {**script_env(), "PYTHONIOENCODING": "utf-8:strict"}
    training = subprocess.run([PYTHON, str(ROOT / "main_pretrain.py"), *TINY, "--dataset", "imagefolder",
                               "--data_path", data, "--batch_size", "8", "--knn_monitor_every", "0",
                               "--output_dir", str(tmp_path / "run")], cwd=ROOT, env=strict, capture_output=True,
                              text=True, timeout=180)
    assert "UnicodeEncodeError" not in training.stderr, training.stderr
    assert "unreadable image file" in training.stdout and "caf\\udce9.png" in training.stdout, training.stdout


def test_class_names_that_differ_by_a_trailing_space_are_shown_quoted(tmp_path):
    """The names were printed bare: "missing: cat ; extra: cat" did not show what differs."""
    fabricate.make_imagefolder(tmp_path, n_per_class=1, classes=2, size=8)
    (tmp_path / "train" / "class_a").rename(tmp_path / "train" / "cat ")
    (tmp_path / "val" / "class_a").rename(tmp_path / "val" / "cat")
    with pytest.raises(DataError, match="missing: 'cat '; extra: 'cat'"):
        registry.load("imagefolder", "train", str(tmp_path))


def test_a_class_folder_linked_to_nowhere_is_refused_not_left_out(tmp_path):
    """A class folder that is a link to a share not mounted was left out without a word: the run trained and was
    scored on the other classes."""
    fabricate.make_imagefolder(tmp_path, n_per_class=1, classes=2, size=8)
    for split in ("train", "val"):
        (tmp_path / split / "class_c").symlink_to("/nonexistent/share/class_c")
    with pytest.raises(DataError) as info:
        registry.load("imagefolder", "train", str(tmp_path))
    assert str(info.value) == (
        f"dataset 'imagefolder': 1 link(s) in {str(tmp_path / 'train')!r} lead nowhere "
        f"({str(tmp_path / 'train' / 'class_c')!r}; the first to '/nonexistent/share/class_c'): mount or restore "
        f"the class folders they link to, or remove them")
    # a link to nowhere named as an image file is a loose file, as before: named in a note, left out
    for split in ("train", "val"):
        (tmp_path / split / "class_c").unlink()
    (tmp_path / "train" / "extra.png").symlink_to("/nonexistent/extra.png")
    assert len(registry.load("imagefolder", "train", str(tmp_path))) == 2


def test_a_folder_inside_a_class_linked_to_nowhere_is_refused_not_left_out(tmp_path):
    """The same link one level down (class_a/more, a share not mounted) was walked as a file name and left out
    without a word; a link to nowhere named as an image file stays a file, unreadable when read."""
    fabricate.make_imagefolder(tmp_path, n_per_class=2, classes=2, size=8)
    inside = tmp_path / "train" / "class_a"
    (inside / "more").symlink_to("/nonexistent/share/more_a")
    with pytest.raises(DataError) as info:
        registry.load("imagefolder", "train", str(tmp_path))
    assert str(info.value) == (
        f"dataset 'imagefolder': 1 link(s) in {str(inside)!r} lead nowhere ({str(inside / 'more')!r}; the first to "
        f"'/nonexistent/share/more_a'): mount or restore the folders they link to, or remove them")
    (inside / "more").unlink()
    (inside / "gone.png").symlink_to("/nonexistent/gone.png")
    assert len(registry.load("imagefolder", "train", str(tmp_path))) == 5


def test_a_link_to_nowhere_named_as_another_kind_of_file_is_left_out_with_a_note(tmp_path, capsys):
    """git-annex and DVC leave a file not fetched as a link to nowhere: a class's notes.json so stopped the run as
    if a folder of images were not mounted."""
    fabricate.make_imagefolder(tmp_path, n_per_class=2, classes=2, size=8)
    (tmp_path / "train" / "class_a" / "notes.json").symlink_to("/nonexistent/annex/objects/SHA256-abc")
    capsys.readouterr()
    assert len(registry.load("imagefolder", "train", str(tmp_path))) == 4
    assert capsys.readouterr().out == (
        f"note: 1 link(s) inside the class folders of {str(tmp_path / 'train')!r} named as files other than images "
        f"lead nowhere (first: class_a/notes.json): left out\n")
    # a name a folder may have (a dated sub-folder, a share not mounted) is still refused, and so is any link to
    # nowhere beside the class folders (Caltech-256's are named 009.bear)
    (tmp_path / "train" / "class_a" / "2019.05").symlink_to("/nonexistent/share/2019.05")
    with pytest.raises(DataError, match=r"1 link\(s\) in .*class_a' lead nowhere \(.*2019\.05'"):
        registry.load("imagefolder", "train", str(tmp_path))
    (tmp_path / "train" / "class_a" / "2019.05").unlink()
    (tmp_path / "train" / "009.bear").symlink_to("/mnt/share_not_mounted/009.bear")
    with pytest.raises(DataError, match=r"1 link\(s\) in .*train' lead nowhere \(.*009\.bear'.*class folders"):
        registry.load("imagefolder", "train", str(tmp_path))


def test_an_empty_class_folder_of_the_test_split_is_refused_when_the_training_split_loads(tmp_path):
    """Only the evaluations listed val/'s files: a run trained to its end, then could not be scored."""
    fabricate.make_imagefolder(tmp_path, n_per_class=2, classes=3, size=8)
    for png in (tmp_path / "val" / "class_b").iterdir():
        png.unlink()
    (tmp_path / "val" / "class_b" / "readme.txt").write_text("no images here\n")
    with pytest.raises(DataError, match=r"1 class folder\(s\) without images \('.*val/class_b'\)"):
        registry.load("imagefolder", "train", str(tmp_path))


def test_folder_statistics_count_every_pixel_of_a_jpeg_decoded_at_reduced_size(tmp_path):
    """A large JPEG's histogram comes from a decode at 1/2 to 1/8 of its size, and was added unweighted: 8 bright
    800 px JPEGs beside 8 dark 300 px PNGs (this folder) gave a mean of 0.5988 where its pixels average 0.7659. The
    statistics are those of every decoded pixel (numpy over the full decodes), to the narrowing of the std that the
    reduced decode's area average makes."""
    rng = np.random.default_rng(0)
    decoded = []
    for split in ("train", "val"):
        for index in range(8):
            for kind, side, low in (("bright", 800, 180), ("dark", 300, 0)):
                folder = tmp_path / split / kind
                folder.mkdir(parents=True, exist_ok=True)
                pixels = rng.integers(low, low + 76, size=(side, side, 3), dtype=np.uint8)
                path = folder / f"{index}.{'jpg' if kind == 'bright' else 'png'}"
                Image.fromarray(pixels).save(path, quality=95)
                if split == "train":
                    with Image.open(path) as image:
                        decoded.append(np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1, 3) / 255)
    everything = np.concatenate(decoded)
    images = registry.load("imagefolder", "train", str(tmp_path))
    np.testing.assert_allclose(images.mean, everything.mean(0), atol=2e-3)
    assert all(abs(ours - theirs) < 0.02 for ours, theirs in zip(images.std, everything.std(0)))


def test_a_constant_channel_is_refused_before_training_divides_by_its_zero_std(tmp_path):
    """Two channels packed into RGB with blue always 0: the computed std 0 made the first loss NaN ('loss is not
    finite'), blamed on the method."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in ("a", "b"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for index in range(3):
                pixels = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
                pixels[..., 2] = 0
                Image.fromarray(pixels).save(folder / f"{index}.png")
    images = registry.load("imagefolder", "train", str(tmp_path))
    assert images.std[2] == 0
    with pytest.raises(ConfigError, match=r"have a constant channel \(std \[.*, 0\.0\]\).*give --std a positive"):
        method_base.DataInfo.of(images)
    assert method_base.DataInfo.of(images, std=[0.3, 0.3, 0.3]).std == (0.3, 0.3, 0.3)


def test_an_evaluation_from_another_folder_reads_the_files_the_run_trained_on(tmp_path):
    """A relative --data_path is recorded absolute: eval_knn run from another working directory, where a folder of
    that name held other images, scored the run on those without a word. The folder a checkpoint read its files from
    is its `data_folder`: where the recorded path reads another folder from here (a path an older version recorded
    relative, or DATASET_PATH set otherwise) that does not hold the training set the run recorded (its fingerprint),
    the evaluation is refused on one line; a copy of the files is the run's."""
    trained_in, elsewhere, run_dir = tmp_path / "a", tmp_path / "b", tmp_path / "run"
    fabricate.make_imagefolder(trained_in / "data", n_per_class=6, classes=3, size=12)
    fabricate.make_imagefolder(elsewhere / "data", n_per_class=4, classes=2, size=12)

    def run_in(folder, script, *args, env=None):
        return subprocess.run([PYTHON, str(ROOT / script), *map(str, args)], cwd=folder,
                              env={**script_env(), **(env or {})}, capture_output=True, text=True, timeout=180)

    assert_ok(run_in(trained_in, "main_pretrain.py", *TINY, "--dataset", "imagefolder", "--data_path", "data",
                     "--batch_size", "4", "--size_crops", "12", "--epochs", "1", "--output_dir", run_dir))
    assert read_run_config(run_dir)["data_path"] == str(trained_in / "data")
    assert_ok(run_in(elsewhere, "eval_knn.py", "--run", run_dir, "--k", "3", "--device", "cpu"))
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert (record["protocol"]["train_images"], record["protocol"]["scored_images"]) == (18, 18), record
    # scored on other images by --data_path: said, as another --dataset is (it was not); a copy is the run's own
    other = run_in(elsewhere, "eval_knn.py", "--run", run_dir, "--k", "3", "--device", "cpu", "--data_path", "data")
    assert_ok(other)
    assert (f"note: run {str(run_dir)!r} was trained on imagefolder {trained_in / 'data'} and is scored on "
            f"imagefolder {elsewhere / 'data'}: its images take the 12 px test view") in other.stdout
    shutil.copytree(trained_in / "data", elsewhere / "copy")
    copied = run_in(elsewhere, "eval_knn.py", "--run", run_dir, "--k", "3", "--device", "cpu", "--data_path", "copy")
    assert_ok(copied)
    assert "note: run" not in copied.stdout
    # its own folder, an image added since it trained: scored as it is now, and said (it was not)
    shutil.copy(next((trained_in / "data" / "train" / "class_a").iterdir()), trained_in / "data" / "train" /
                "class_a" / "added.png")
    changed = run_in(trained_in, "eval_knn.py", "--run", run_dir, "--k", "3", "--device", "cpu")
    assert_ok(changed)
    changed_note = (f"note: the train split of imagefolder in {trained_in / 'data'} has changed since run "
                    f"{str(run_dir)!r} trained on it (its file names or labels): it is scored on the files as they "
                    f"are now")
    assert changed_note in changed.stdout
    named = run_in(elsewhere, "eval_knn.py", "--run", run_dir, "--k", "3", "--device", "cpu", "--data_path",
                   trained_in / "data")  # the same folder, named: the same note (not "trained on A, scored on A")
    assert_ok(named)
    assert changed_note in named.stdout and "was trained on" not in named.stdout
    (trained_in / "data" / "train" / "class_a" / "added.png").unlink()

    fabricate.make_cifar10(trained_in / "cifar", n_train=40, n_test=20)
    fabricate.make_cifar10(elsewhere / "cifar", n_train=30, n_test=20)
    cifar_run = tmp_path / "cifar_run"
    assert_ok(run_in(trained_in, "main_pretrain.py", *TINY, "--dataset", "cifar10", "--batch_size", "8",
                     "--epochs", "1", "--output_dir", cifar_run, env={"DATASET_PATH": "cifar"}))
    refused = run_in(elsewhere, "eval_knn.py", "--run", cifar_run, "--k", "3", "--device", "cpu",
                     env={"DATASET_PATH": "cifar"})
    assert_user_error(refused, "eval_knn.py", f"trained on the files in {os.path.realpath(trained_in / 'cifar')}",
                      f"its dataset's path ($DATASET_PATH, or ./data) reads {os.path.realpath(elsewhere / 'cifar')} "
                      f"from here, which does not hold that training set", "give --data_path")
    assert_ok(run_in(elsewhere, "eval_knn.py", "--run", cifar_run, "--k", "3", "--device", "cpu",
                     "--data_path", trained_in / "cifar"))
    shutil.rmtree(elsewhere / "cifar")
    shutil.copytree(trained_in / "cifar", elsewhere / "cifar")  # each job's own copy of the files
    assert_ok(run_in(elsewhere, "eval_knn.py", "--run", cifar_run, "--k", "3", "--device", "cpu",
                     env={"DATASET_PATH": "cifar"}))
