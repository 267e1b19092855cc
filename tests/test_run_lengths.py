"""Lengths that do not silently depend on the dataset's size: prototype freezing can be given in epochs as well as
in iterations, and a setting that covers the whole run is told on one line at start."""
from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import pytest
import torch

from clusterlab import engine
from clusterlab.methods import METHODS, DataInfo, Progress
from clusterlab.programs.train import parse_args
from conftest import TINY, assert_ok, run_script
from test_amp import images


def swav(*flags):
    args = parse_args("pretrain", [*TINY, "--output_dir", "unused", *flags])
    return METHODS["swav"](args, DataInfo.of(images()), torch.device("cpu"))


@pytest.mark.parametrize("flags, steps_per_epoch, frozen", [
    (["--freeze_prototypes_niters", "20"], 14, 20),
    (["--freeze_prototypes_epochs", "1.5"], 14, 21),  # epochs replace the default iterations (313)
    (["--freeze_prototypes_epochs", "0"], 14, 0),
    (["--freeze_prototypes_epochs", "2"], 3, 6),
])
def test_prototypes_get_no_gradient_for_the_length_given(flags, steps_per_epoch, frozen):
    method = swav(*flags)
    assert method.freeze_steps(steps_per_epoch) == frozen
    for step in (frozen - 1, frozen):
        method.prototypes.weight.grad = torch.ones_like(method.prototypes.weight)
        method.after_backward(Progress(step // steps_per_epoch, step % steps_per_epoch, step, steps_per_epoch))
        assert (method.prototypes.weight.grad is None) == (step < frozen)


def test_settings_covering_the_whole_run_are_told_at_start(tmp_path):
    # digits, batch 64: 14 steps per epoch, 28 in 2 epochs
    done = run_script("main_pretrain.py", *TINY, "--freeze_prototypes_niters", 28, "--warmup_epochs", 2,
                      "--queue_length", 128, "--epoch_queue_starts", 2, "--checkpoint_epochs", 1, 3, 5,
                      "--knn_monitor_every", 3, "--output_dir", tmp_path / "run")
    assert_ok(done)
    notes = [line for line in done.stdout.splitlines() if line.startswith("note: ")]
    assert len(notes) == 5, done.stdout
    assert ("warms up for the whole of the run (28 warm-up iterations of --warmup_epochs 2.0 in 28 (14 an epoch)): it "
            "never decays" in notes[0])
    assert "frozen for the whole run (28 freezing iterations >= 28 in 2 epochs of 14" in notes[1]
    assert "the queue never starts (--epoch_queue_starts 2 >= --epochs 2)" in notes[2]
    assert notes[3] == "note: --checkpoint_epochs 3 5: beyond --epochs 2, never written"
    assert notes[4] == "note: --knn_monitor_every 3: beyond --epochs 2, the kNN monitor never runs"
    # (--final_lr 0: the config's cosine end, which a step schedule does not read, is refused)
    flat = run_script("main_pretrain.py", *TINY, "--freeze_prototypes_epochs", 1.5, "--warmup_epochs", 1,
                      "--schedule", "step", "--lr_drops", 2, "--final_lr", 0, "--output_dir", tmp_path / "flat")
    assert_ok(flat)
    assert [line for line in flat.stdout.splitlines() if line.startswith("note: ")] == [
        "note: --schedule step never drops the learning rate (--lr_drops 2 within the run, 2 epochs): it stays at "
        "4.8 after the warm-up"]
    quiet = run_script("main_pretrain.py", *TINY, "--freeze_prototypes_epochs", 1.5, "--warmup_epochs", 1,
                       "--schedule", "step", "--lr_drops", 1, "--queue_length", 128, "--epoch_queue_starts", 1,
                       "--final_lr", 0, "--output_dir", tmp_path / "quiet")
    assert_ok(quiet)
    assert "note: " not in quiet.stdout


@pytest.mark.parametrize("flags, note", [
    # 1.97 epochs of 14 steps round to 28 warm-up steps: the cosine never starts
    ({"warmup_epochs": 1.97}, "for the whole of the run (28 warm-up iterations of --warmup_epochs 1.97 in 28 (14 "
                              "an epoch)): it never decays"),
    # 27 steps: the cosine's first step, the 28th, is still at the peak (no note before)
    ({"warmup_epochs": 1.96}, "(27 warm-up iterations of --warmup_epochs 1.96 in 28 (14 an epoch)): it never decays"),
    ({"warmup_epochs": 1.85}, None),  # 26 steps, 1 of them decaying
    ({"epochs": 4, "schedule_period": 2, "warmup_epochs": 2},
     "for the whole of each period of --schedule_period (28 warm-up iterations of --warmup_epochs 2 in 28 (14 an"),
    ({"epochs": 4, "schedule_period": 2, "warmup_epochs": 1}, None),
])
def test_a_warm_up_covering_the_run_or_each_period_is_told_in_iterations(flags, note):
    args = argparse.Namespace(**{"schedule": "cosine", "lr": 1.0, "final_lr": 0.0, "start_warmup": 0.0,
                                 "lr_drops": [], "lr_gamma": 0.1, "epochs": 2, "schedule_period": 0,
                                 "checkpoint_epochs": [], "knn_monitor_every": 0, **flags})
    trainer = engine.Trainer.__new__(engine.Trainer)
    trainer.method = SimpleNamespace(whole_run_settings=lambda steps: [])
    trainer.args, trainer.steps_per_epoch = args, 14
    trainer.schedule = engine.build_schedule(args, 14)
    notes = trainer.whole_run_settings()
    assert notes == [] if note is None else (len(notes) == 1 and note in notes[0]), notes


@pytest.mark.parametrize("queue_length, starts, note", [
    (1024, 1, "the queue never takes part: it is full after 16 iterations (--queue_length 1024 / batch 64), the run "
              "has 14 from --epoch_queue_starts 1 on (14 an epoch)"),
    (896, 1, "it is full after 14 iterations"),  # full at the last step's end: never scored
    (832, 1, None),  # full after 13 steps, scored in the 14th
    (128, 2, "the queue never starts (--epoch_queue_starts 2 >= --epochs 2)"),
    (1024, 0, None),
])
def test_a_queue_that_never_fills_is_told(queue_length, starts, note):
    method = swav("--queue_length", str(queue_length), "--epoch_queue_starts", str(starts),
                  "--freeze_prototypes_niters", "0")
    notes = method.whole_run_settings(14)  # digits at batch 64, 2 epochs
    assert notes == [] if note is None else (len(notes) == 1 and note in notes[0]), notes


@pytest.mark.parametrize("flags, note", [
    ({"lr_drops": [1]}, None),
    ({"lr_drops": [4]}, "(--lr_drops 4 within the run, 4 epochs): it stays at 1"),
    ({"lr_drops": [0]}, "(--lr_drops 0 within the run, 4 epochs): it stays at 0.1"),  # dropped from the start
    ({"lr_drops": [], "warmup_epochs": 1},
     "(--lr_drops none within the run, 4 epochs): it stays at 1 after the warm-up"),
    ({"lr_drops": [2], "schedule_period": 1}, "within each period of --schedule_period, 1 epoch): it stays at 1"),
    ({"lr_drops": [2], "schedule_period": 4}, None),
])
def test_a_step_schedule_that_never_drops_is_told(flags, note):
    trainer = engine.Trainer.__new__(engine.Trainer)
    trainer.method = SimpleNamespace(whole_run_settings=lambda steps: [])
    trainer.steps_per_epoch = 10
    trainer.args = argparse.Namespace(**{"schedule": "step", "lr": 1.0, "lr_gamma": 0.1, "epochs": 4,
                                         "schedule_period": 0, "warmup_epochs": 0, "checkpoint_epochs": [],
                                         "knn_monitor_every": 0, "final_lr": 0.0, "start_warmup": 0.0, **flags})
    trainer.schedule = engine.build_schedule(trainer.args, 10)
    notes = trainer.whole_run_settings()
    assert notes == [] if note is None else (len(notes) == 1 and note in notes[0]), notes


@pytest.mark.parametrize("schedule, epochs, period, notes", [
    # the run ends part-way through the cosine of a period longer than it: no note, its last step at half the peak
    ("cosine", 2, 4, ["--schedule_period 4 is longer than the run (--epochs 2): the schedule stops part-way, its last "
                      "step at learning rate 0.7169"]),
    ("cosine", 4, 3, ["--epochs 4 is not a multiple of --schedule_period 3: the last period stops after 1 of its 3 "
                      "epochs, its last step at learning rate 0.9755"]),
    ("cosine", 6, 3, []),
    # the step schedule's drop at 3 lies beyond the run: both told, "within the run", not "each period" (of 4)
    ("step", 2, 4, ["--schedule step never drops the learning rate (--lr_drops 3 within the run, 2 epochs): it stays "
                    "at 1 after the warm-up",
                    "--schedule_period 4 is longer than the run (--epochs 2): the schedule stops part-way, its last "
                    "step at learning rate 1"]),
])
def test_a_schedule_period_the_run_ends_inside_is_told(schedule, epochs, period, notes):
    """The schedule restarts every --schedule_period epochs, and was only ever measured against the run's length: a
    period longer than the run, or one the run cuts short, ended its cosine far above --final_lr without a word."""
    trainer = engine.Trainer.__new__(engine.Trainer)
    trainer.method = SimpleNamespace(whole_run_settings=lambda steps: [])
    trainer.steps_per_epoch = 4
    trainer.args = argparse.Namespace(schedule=schedule, lr=1.0, final_lr=0.0, lr_gamma=0.1, lr_drops=[3],
                                      epochs=epochs, schedule_period=period, warmup_epochs=0.5, start_warmup=0.0,
                                      checkpoint_epochs=[], knn_monitor_every=0)
    trainer.schedule = engine.build_schedule(trainer.args, 4)
    assert ["note: " + note for note in trainer.whole_run_settings()] == ["note: " + note for note in notes]


def test_no_warm_up_is_no_warm_up_covering_a_run_of_one_step():
    """0 warm-up iterations, and one step an epoch: the note said the learning rate warmed up for the whole run."""
    trainer = engine.Trainer.__new__(engine.Trainer)
    trainer.method = SimpleNamespace(whole_run_settings=lambda steps: [])
    trainer.steps_per_epoch = 1
    trainer.args = argparse.Namespace(schedule="constant", lr=1.0, final_lr=0.0, lr_gamma=0.1, lr_drops=[], epochs=1,
                                      schedule_period=0, warmup_epochs=0, start_warmup=0.0, checkpoint_epochs=[],
                                      knn_monitor_every=0)
    trainer.schedule = engine.build_schedule(trainer.args, 1)
    assert trainer.whole_run_settings() == []


def test_swav_prototypes_are_unit_vectors_before_every_step():
    """The loss tests give scores directly: only this sees the prototypes normalised before the step (upstream
    normalises them at the start of every iteration)."""
    method = swav()
    with torch.no_grad():
        method.prototypes.weight.mul_(3.0)
    method.before_step(Progress(0, 0, 0, 4))
    torch.testing.assert_close(method.prototypes.weight.norm(dim=1), torch.ones(method.prototypes.weight.shape[0]))


@pytest.mark.parametrize("channels_last, device, sizes, told", [
    (True, "cpu", [48, 12], True), (True, "cpu", [0], True),  # 0: the images' 64 px
    (True, "cpu", [44, 20], False), (False, "cpu", [96], False), (True, "cuda", [96], False)])
def test_channels_last_crops_of_48_px_on_the_cpu_are_told_at_start(channels_last, device, sizes, told):
    """torch 2.14.1's oneDNN convolution backward died with a segmentation fault on channels-last inputs from 48 px
    on: no message of ours could follow it, so the start says so where --channels_last meets such crops."""
    trainer = engine.Trainer.__new__(engine.Trainer)
    trainer.args = argparse.Namespace(channels_last=channels_last, size_crops=sizes, knn_monitor_every=0)
    trainer.args.workers = 0  # (no loader process: a keyword of that name would put the test in the slow lane)
    trainer.ctx, trainer.kind, trainer.amp_dtype = SimpleNamespace(device=torch.device(device)), "pretrain", None
    trainer.method = SimpleNamespace(info=SimpleNamespace(image_size=64))
    trainer.train_set = SimpleNamespace(folder=None, split="train", in_memory=True)
    notes = trainer.start_notes()
    assert bool(notes) == told and all("leave --channels_last out" in note for note in notes)


def test_loader_workers_for_a_set_in_memory_are_told_at_start(tmp_path):
    """--workers serves image folders; on a set held in memory (CIFAR, STL-10, digits) it was ignored without a
    word, and a grid copied from an ImageNet recipe asked for workers it never got."""
    done = run_script("main_pretrain.py", *TINY, "--epochs", 1, "--workers", 2, "--output_dir", tmp_path / "run")
    assert_ok(done)
    assert ("note: --workers 2: digits is held in memory and augmented in the training process; no loader process "
            "starts (the flag serves image folders)") in done.stdout
    assert "--train_split test" not in done.stdout


def test_training_on_the_test_split_is_told_at_start(tmp_path):
    """The evaluations score the test split: a run trained on it was scored on its own training images, its
    numbers in one table with runs that never saw them, without a word."""
    done = run_script("main_pretrain.py", *TINY, "--epochs", 1, "--train_split", "test", "--output_dir",
                      tmp_path / "run")
    assert_ok(done)
    assert ("note: --train_split test: the run trains on the digits test images that eval_knn.py, eval_cluster.py "
            "and eval_linear.py score (a transductive protocol; its numbers do not compare with runs trained on the "
            "train split)") in done.stdout


def test_a_monitor_k_beyond_the_labelled_images_is_told_and_recorded(tmp_path):
    """--knn_monitor_k above the training set: every image votes, which the log recorded as the k asked for
    (eval_knn.py notes it and records k_used; the monitor now does the same)."""
    done = run_script("main_pretrain.py", *TINY, "--epochs", 1, "--knn_monitor_every", 1, "--knn_monitor_k", 5000,
                      "--output_dir", tmp_path / "run")
    assert_ok(done)
    assert ("note: --knn_monitor_k 5000 is more than the 898 labelled training images: all of them vote "
            "(train_log.jsonl records k_used)") in done.stdout
    monitor = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()
               if '"knn_monitor"' in line]
    assert [(record["k"], record["k_used"]) for record in monitor] == [(5000, 898)]


def test_a_memory_bank_monitor_records_the_rows_that_voted(tmp_path):
    """NPID's monitor votes with the bank rows a step has written: batch 128 over 898 images writes 896 in an epoch
    (the last, partial batch is dropped), so k = 897 is more than voted, though not more than the labelled images."""
    done = run_script("main_pretrain.py", "--method", "npid", "--dataset", "digits", "--width", 4, "--epochs", 1,
                      "--batch_size", 128, "--device", "cpu", "--knn_monitor_every", 1, "--knn_monitor_k", 897,
                      "--output_dir", tmp_path / "run")
    assert_ok(done)
    monitor = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()
               if '"knn_monitor"' in line]
    assert [(record["k"], record["k_used"]) for record in monitor] == [(897, 896)]
    assert "epoch 1: kNN monitor (k=897, 896 images vote, memory_bank) top1 " in done.stdout  # (said k=897 alone)
