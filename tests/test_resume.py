"""Exact resume (engine.py): a run stopped by SIGUSR2 or SIGTERM in the middle of its first epoch exits 75 with a
checkpoint, and the same command started again ends bit-identical (model, optimiser, SwAV queue, RNG) to a run that
was never stopped. A command whose run-defining flags differ from the checkpoint's is refused, writing nothing."""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch
import yaml

from clusterlab import checkpoint, distributed, engine
from clusterlab.data import load
from clusterlab.methods import METHODS, DataInfo
from clusterlab.programs.train import parse_args
from conftest import (PYTHON, ROOT, TINY, assert_ok, assert_same_tensors, assert_user_error, copy_run, entry_module,
                      run_script, script_env, snapshot, write_fashion_mnist)

# batch 32: 28 steps per epoch, so the stop lands mid-epoch; the queue is in use from the first step on, and the
# prototypes start learning after 5 steps, so every piece of state changes before and after the stop.
STEPS = 898 // 32
RESUMABLE = [*TINY, "--batch_size", "32", "--log_every", "1", "--queue_length", "64", "--epoch_queue_starts", "0",
             "--freeze_prototypes_niters", "5"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same run, never interrupted."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    assert_ok(run_script("main_pretrain.py", *RESUMABLE, "--output_dir", run_dir))
    return run_dir


def logged_steps(run_dir) -> list[dict]:
    path = run_dir / "train_log.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}") and '"step"' in line]


def epoch_means(run_dir) -> list[dict]:
    """The per-term means of every epoch_end record of RUN/train_log.jsonl."""
    records = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k.endswith("_mean")} for r in records if r.get("epoch_end")]


# Runs `python SCRIPT ARGS` holding step HELD of the first epoch until a stop signal has arrived: a signal sent from
# outside once the log shows a step then lands mid-epoch however far a fast run would otherwise have gone.
HOLD_UNTIL_SIGNALLED = """
import runpy, sys, time
from clusterlab import engine, signals
held = int(sys.argv[1])
sys.argv = sys.argv[2:]
original = engine.Trainer.step
def step(self, batch, progress):
    if (progress.epoch, progress.step) == (0, held):
        deadline = time.time() + 120
        while signals.received() is None and time.time() < deadline:
            time.sleep(0.01)
    return original(self, batch, progress)
engine.Trainer.step = step
runpy.run_path(sys.argv[0], run_name="__main__")
"""
HELD_STEP = 2


def stop_after_first_step(run_dir, signum, flags=None, to_group=False) -> tuple[subprocess.CompletedProcess, int]:
    """Start the run (RESUMABLE, or `flags`, which name run_dir, with --log_every 1), wait until train_log.jsonl
    shows a step, send `signum` from outside (`to_group`: to every process of the run, its loader workers too, as
    Slurm signals a step); the run stops after step HELD_STEP at the latest (sooner when the signal arrives before
    it). The status and the steps logged."""
    flags = flags or [*RESUMABLE, "--output_dir", run_dir]
    command = [PYTHON, "-c", HOLD_UNTIL_SIGNALLED, str(HELD_STEP), str(ROOT / "main_pretrain.py"), *map(str, flags)]
    process = subprocess.Popen(command, cwd=ROOT, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=to_group)
    deadline = time.time() + 120
    while not logged_steps(run_dir) and process.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    try:
        if to_group:
            os.killpg(process.pid, signum)
        else:
            process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:  # a run that does not stop is a failure, not a process left behind
            process.kill()
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr), len(logged_steps(run_dir))


# (SIGUSR1: what other tools ask Slurm for, `--signal=USR1@90`; it killed the run without a checkpoint)
@pytest.mark.parametrize("signum", [signal.SIGUSR2, signal.SIGUSR1, signal.SIGTERM],
                         ids=["SIGUSR2", "SIGUSR1", "SIGTERM"])
def test_stopped_mid_epoch_then_resumed_is_bit_identical(tmp_path, reference, signum):
    run_dir = tmp_path / "run"
    stopped, steps_logged = stop_after_first_step(run_dir, signum)
    assert stopped.returncode == 75, stopped.stderr
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "interrupted" and status["signal"] == signum.name
    assert status["epoch"] == 0 and 0 < status["step"] <= HELD_STEP + 1, status  # mid-way through the first epoch
    assert status["step"] == steps_logged  # saved at the step boundary after the last step it logged
    saved = checkpoint.load(run_dir / "checkpoint.pth", kind="pretrain", method="swav")
    assert (saved["epoch"], saved["step"], saved["global_step"]) == (0, status["step"], status["step"])
    assert f"saved {run_dir / 'checkpoint.pth'} at epoch 1 step {status['step']}/{STEPS}" in stopped.stdout

    resumed = run_script("main_pretrain.py", *RESUMABLE, "--output_dir", run_dir)
    assert_ok(resumed)
    assert f"from epoch 1 step {status['step']}/{STEPS} " in resumed.stdout
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"
    steps = [(r["epoch"], r["step"]) for r in logged_steps(run_dir)]
    assert steps == [(e, s) for e in range(2) for s in range(STEPS)]  # every step once, none twice
    assert saved["term_count"] == status["step"] and set(saved["term_totals"]) == {"loss", "swav"}
    assert epoch_means(run_dir) == epoch_means(reference)  # the interrupted epoch's mean covers all its steps

    ours = checkpoint.load(run_dir / "checkpoint.pth")
    theirs = checkpoint.load(reference / "checkpoint.pth")
    assert not torch.equal(saved["model"]["prototypes.weight"], theirs["model"]["prototypes.weight"])
    assert theirs["method_state"]["queue"]["filled"] == 64
    for key in ("model", "optimizer", "scaler", "method_state", "method_random", "rng", "epoch", "step",
                "global_step", "data_info", "term_totals", "term_count"):
        assert_same_tensors(ours[key], theirs[key], key)
    assert {k: v for k, v in ours["args"].items() if k != "output_dir"} == \
        {k: v for k, v in theirs["args"].items() if k != "output_dir"}


def retagged(run_dir, method: str) -> None:
    """Rewrite the run's checkpoint as if `method` had written it: another method's checkpoint in the run directory
    (a method main_pretrain.py does not even offer; the next test resumes with one it offers)."""
    state = checkpoint.load(run_dir / "checkpoint.pth")
    tags = ("format", "schema", "kind", "method")
    checkpoint.save({k: v for k, v in state.items() if k not in tags}, run_dir / "checkpoint.pth", kind="pretrain",
                    method=method)


@pytest.mark.parametrize("change, words", [
    (["--batch_size", "64"], ["--batch_size 32", "64", "new --output_dir"]),
    (["--dataset", "fashion_mnist"], ["--dataset 'digits'", "'fashion_mnist'"]),
    (["--seed", "1"], ["--seed 0", "1"]),
    (["--init", "legacy"], ["--init 'kaiming'", "'legacy'"]),
    (["--optimizer", "sgd"], ["--optimizer 'lars'", "'sgd'"]),
    # the flag named, not only the tensor whose shape differs
    (["--nmb_prototypes", "20"], ["does not fit", "prototypes.weight", "flags that differ: --nmb_prototypes 10 -> 20"]),
    (["--queue_length", "128"], ["does not fit", "--queue_length"]),
    ("retag", ["method 'sela'", "not 'swav'"]),
])
def test_resume_with_other_run_flags_is_refused(tmp_path, reference, change, words):
    run_dir = copy_run(reference, tmp_path / "run")
    if change == "retag":
        retagged(run_dir, "sela")
        change = []
    if "fashion_mnist" in change:
        change = [*change, "--data_path", write_fashion_mnist(tmp_path / "fashion")]
    before = snapshot(run_dir)
    result = run_script("main_pretrain.py", *RESUMABLE, "--epochs", 3, *change, "--output_dir", run_dir)
    assert_user_error(result, "main_pretrain.py", str(run_dir / "checkpoint.pth"), *words)
    assert snapshot(run_dir) == before


def test_a_resumed_run_trains_with_the_commands_optimiser_settings(tmp_path, reference):
    """torch's Optimizer.load_state_dict takes every group setting from the checkpoint; the weight decay, momentum
    and LARS trust of the resuming command (which config.yaml records) are what the resumed run steps with, and the
    momentum buffers are the checkpoint's."""
    run_dir = copy_run(reference, tmp_path / "run")
    changed = ["--weight_decay", "0.1", "--momentum", "0.5", "--lars_trust", "0.02"]
    args = parse_args("pretrain", [*map(str, RESUMABLE), "--epochs", "3", *changed, "--output_dir", str(run_dir)])
    train = load("digits", "train")
    method = METHODS["swav"](args, DataInfo.of(train), torch.device("cpu"))
    trainer = engine.Trainer(method, args, distributed.init("cpu"), run_dir, train)
    assert trainer.resume() == (2, 0)
    saved = checkpoint.load(run_dir / "checkpoint.pth")["optimizer"]
    assert {(g["weight_decay"], g["momentum"], g["trust_coefficient"]) for g in saved["param_groups"]} \
        == {(1e-6, 0.9, 0.001)}
    assert {(g["weight_decay"], g["momentum"], g["trust_coefficient"]) for g in trainer.optimizer.param_groups} \
        == {(0.1, 0.5, 0.02)}
    assert_same_tensors(trainer.optimizer.state_dict()["state"], saved["state"], "momentum buffers")


def _resumed_trainer(run_dir, *flags) -> engine.Trainer:
    args = parse_args("pretrain", [*map(str, RESUMABLE), *map(str, flags), "--output_dir", str(run_dir)])
    train = load("digits", "train")
    trainer = engine.Trainer(METHODS["swav"](args, DataInfo.of(train), torch.device("cpu")), args,
                             distributed.init("cpu"), run_dir, train)
    trainer.resume()
    return trainer


def test_a_run_resumed_under_other_schedule_flags_says_at_what_rates(tmp_path):
    """A finished cosine run extended with a larger --epochs climbs back from its final rate to the middle of the new
    curve: allowed (config.yaml records the new flags), and said at the start, with the rate of the last step."""
    run_dir = tmp_path / "run"
    cosine = [*RESUMABLE, "--warmup_epochs", 0]
    assert_ok(run_script("main_pretrain.py", *cosine, "--output_dir", run_dir))
    assert _resumed_trainer(run_dir, "--warmup_epochs", 0).resume_notes == []
    extended = _resumed_trainer(run_dir, "--warmup_epochs", 0, "--epochs", 4)
    step = extended.global_step
    assert step == 2 * STEPS
    last = engine.build_schedule(parse_args("pretrain", [*map(str, cosine), "--output_dir", "x"]), STEPS)(step - 1)
    now = extended.schedule(step)
    # swav_digits.yaml: lr 4.8 -> 0.0048; the last of 56 steps, then the middle of 112
    assert last == pytest.approx(0.0048 + (4.8 - 0.0048) * (1 + math.cos(math.pi * 55 / 56)) / 2)
    assert now == pytest.approx((4.8 + 0.0048) / 2)
    assert extended.resume_notes == [f"the schedule's flags changed on resume (--epochs 2 -> 4): step {step} trains "
                                     f"at learning rate {now:.6g}, the last step trained at {last:.6g}"]
    result = run_script("main_pretrain.py", *cosine, "--epochs", 3, "--output_dir", run_dir)
    assert_ok(result)
    assert "note: the schedule's flags changed on resume (--epochs 2 -> 3)" in result.stdout
    # kept where the tables read it: config.yaml, and the checkpoint for the starts to come
    change = {"epoch": 2, "step": 0, "before": {"epochs": 2}, "after": {"epochs": 3}}
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["resume_changes"] == [change]
    assert checkpoint.load(run_dir / "checkpoint.pth")["resume_changes"] == [change]
    assert_ok(run_script("main_pretrain.py", *cosine, "--epochs", 4, "--output_dir", run_dir))
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["resume_changes"] == [
        change, {"epoch": 3, "step": 0, "before": {"epochs": 3}, "after": {"epochs": 4}}]


def test_a_finished_run_started_again_with_other_flags_keeps_its_record(tmp_path, reference):
    """Nothing trains, so config.yaml keeps the flags (and code) that trained the run: the tables group runs by it,
    and rewritten it filed the run under settings it never trained with."""
    run_dir = copy_run(reference, tmp_path / "run")
    before = snapshot(run_dir)
    result = run_script("main_pretrain.py", *RESUMABLE, "--temperature", 0.5, "--epsilon", 0.3, "--output_dir", run_dir)
    assert_ok(result)
    assert f"{run_dir} has trained its 2 epochs: nothing to train" in result.stdout and "note:" not in result.stdout
    # the flags that differ are named (the user trying them without a new --output_dir was told nothing)
    assert "this command's other flags (--temperature 0.1 -> 0.5, --epsilon 0.02 -> 0.3) are not applied: a new " \
           "--output_dir trains them" in result.stdout, result.stdout
    after = snapshot(run_dir)
    assert {name: after[name] for name in ("config.yaml", "checkpoint.pth")} == \
        {name: before[name] for name in ("config.yaml", "checkpoint.pth")}
    (run_dir / "config.yaml").write_text("args: null\n")  # unreadable as a run's record: written again
    assert_ok(run_script("main_pretrain.py", *RESUMABLE, "--output_dir", run_dir))
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["args"]["epochs"] == 2


def test_a_run_stopped_at_an_epochs_end_and_started_with_epochs_lowered_to_it_is_refused(
        tmp_path, run_in_process, monkeypatch):
    """Stopped at the end of epoch 1 of 3 and started with --epochs 1, the run was taken for one that had finished:
    status.json said "finished" with 1 epoch, while config.yaml and the checkpoint kept --epochs 3 (the tables filed
    it as a 3-epoch run stopped early, which is what it is). Refused, writing nothing; lowered mid-epoch, a run
    trains on under the new schedule and records the change."""
    run_dir = tmp_path / "run"
    cosine = [*RESUMABLE, "--warmup_epochs", 0, "--output_dir", run_dir]
    signal_when(monkeypatch, "step", lambda trainer, batch, progress: (progress.epoch, progress.step + 1) == (
        0, trainer.steps_per_epoch))
    assert run_in_process("main_pretrain.py", *cosine, "--epochs", 3).returncode == 75
    before = snapshot(run_dir)
    refused = run_script("main_pretrain.py", *cosine, "--epochs", 1)
    assert_user_error(refused, "main_pretrain.py", f"--epochs 1: {run_dir / 'checkpoint.pth'} stands at the end of "
                      f"epoch 1 of the 3 its schedule plans, so no step would train under the new one (use --epochs 3 "
                      f"to finish the run")
    assert snapshot(run_dir) == before
    assert json.loads((run_dir / "status.json").read_text())["state"] == "interrupted"


def test_resume_with_another_registered_method_is_refused(tmp_path, reference):
    others = sorted(name for name, cls in METHODS.items() if cls.program_kind == "pretrain" and name != "swav")
    assert others, "main_pretrain.py should offer more methods than swav"
    run_dir = copy_run(reference, tmp_path / "run")
    before = snapshot(run_dir)
    # Not the SwAV config file: its swav-only keys would be refused before the checkpoint is looked at.
    result = run_script("main_pretrain.py", "--method", others[0], "--dataset", "digits", "--batch_size", 32,
                        "--width", 4, "--size_crops", 8, "--epochs", 3, "--device", "cpu", "--output_dir", run_dir)
    assert_user_error(result, "main_pretrain.py", str(run_dir / "checkpoint.pth"), "method 'swav'",
                      f"not {others[0]!r}")
    assert snapshot(run_dir) == before


def test_a_signal_during_the_last_checkpoint_finishes_the_run_then_exits_for_the_requeue(run_in_process,
                                                                                          monkeypatch, tmp_path):
    """A stop signal that arrives after the last step's check (here: while the last checkpoint is written) cannot
    stop the loop any more: the run is complete, status.json says "finished", and the process still exits 75 so
    that a job's later steps run in the requeued allocation."""
    from clusterlab import engine, signals

    save = engine.Trainer.save

    def save_then_signal(trainer, epoch, step, names=("checkpoint.pth",)):
        save(trainer, epoch, step, names)
        if epoch == trainer.args.epochs:
            monkeypatch.setattr(signals, "_received", signal.SIGUSR2)

    monkeypatch.setattr(signals, "_received", None)
    monkeypatch.setattr(signals, "_deferring", False)
    monkeypatch.setattr(engine.Trainer, "save", save_then_signal)
    run_dir = tmp_path / "run"
    result = run_in_process("main_pretrain.py", *TINY, "--epochs", 1, "--output_dir", run_dir)
    assert result.returncode == 75, result.stderr
    assert "SIGUSR2 at the end of the last epoch: training is complete" in result.stdout
    status = json.loads((run_dir / "status.json").read_text())
    assert (status["state"], status["epoch"]) == ("finished", 1)
    assert checkpoint.load(run_dir / "checkpoint.pth")["epoch"] == 1


def signal_when(monkeypatch, method_name: str, moment) -> None:
    """A stop signal (as its handler records one) when Trainer.`method_name` is called with arguments for which
    `moment(*args)` holds, before the call runs."""
    from clusterlab import engine, signals

    original = getattr(engine.Trainer, method_name)

    def signalled(trainer, *args, **kwargs):
        if moment(trainer, *args):
            monkeypatch.setattr(signals, "_received", signal.SIGUSR2)
        return original(trainer, *args, **kwargs)

    monkeypatch.setattr(signals, "_received", None)
    monkeypatch.setattr(signals, "_deferring", False)
    monkeypatch.setattr(engine.Trainer, method_name, signalled)


def test_a_signal_during_an_epochs_knn_monitor_stops_before_the_next_epoch(run_in_process, monkeypatch, tmp_path):
    """After the last step's check, the epoch's end (monitor, checkpoint) runs on; the signal is acted on once it is
    over: saved at (1, 0), nothing of epoch 2 started."""
    signal_when(monkeypatch, "knn_monitor", lambda trainer, epoch: epoch == 0)
    run_dir = tmp_path / "run"
    result = run_in_process("main_pretrain.py", *TINY, "--epochs", 2, "--knn_monitor_every", 1, "--output_dir",
                            run_dir)
    assert result.returncode == 75, result.stderr
    assert f"SIGUSR2: saved {run_dir / 'checkpoint.pth'} at the end of epoch 1;" in result.stdout
    status = json.loads((run_dir / "status.json").read_text())
    assert (status["state"], status["epoch"], status["step"]) == ("interrupted", 1, 0)
    assert {r["epoch"] for r in logged_steps(run_dir)} == {0}


def test_a_signal_in_the_first_epochs_start_leaves_the_run_interrupted(run_in_process, monkeypatch, tmp_path):
    """Before the loop defers signals (the method's epoch start in a process's first epoch: a resumed Super-AND's
    round start, a SwAV queue being made), a signal ends the process at once with 75; status.json kept "running"."""
    from clusterlab import signals
    from clusterlab.methods.swav import SwAV

    start = SwAV.on_epoch_start

    def signalled(method, epoch):
        signals._handle(signal.SIGUSR2, None)
        start(method, epoch)

    for name, value in (("_received", None), ("_seen", set()), ("_deferring", False), ("_leaving", False)):
        monkeypatch.setattr(signals, name, value)
    monkeypatch.setattr(SwAV, "on_epoch_start", signalled)
    run_dir = tmp_path / "run"
    result = run_in_process("main_pretrain.py", *TINY, "--epochs", 1, "--output_dir", run_dir)
    assert result.returncode == 75, result.stderr
    status = json.loads((run_dir / "status.json").read_text())
    assert (status["state"], status["epoch"], status["step"], status["signal"]) == ("interrupted", 0, 0, "SIGUSR2")


def test_config_records_the_code_of_every_start(monkeypatch, tmp_path):
    """An epoch trained with uncommitted changes, then resumed from a clean tree: config.yaml's git fields are the
    last start's (clean), trained_by keeps both, and the tables read the run as dirty. A run started from it (its
    --pretrained) carries them in pretrained_from."""
    import yaml

    from clusterlab import results
    from clusterlab.methods.cluster_base import pretrained_origin

    dirty, clean = {"git_commit": "c0ffee", "git_dirty": True}, {"git_commit": "c0ffee", "git_dirty": False}
    run_dir = tmp_path / "run"
    for epochs, state in ((1, dirty), (2, clean), (3, clean)):
        monkeypatch.setattr(engine, "git_state", lambda state=state: dict(state))
        entry_module("main_pretrain").main([str(a) for a in (*TINY, "--epochs", epochs, "--output_dir", run_dir)])
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert {k: config[k] for k in clean} == clean and config["trained_by"] == [dirty, clean]
    assert results.revision(clean, config) == "dirty"
    state = checkpoint.load(run_dir / "checkpoint.pth")
    assert state["trained_by"] == [dirty, clean]
    assert pretrained_origin(run_dir / "checkpoint.pth", state)["trained_by"] == [dirty, clean]
    # a checkpoint written before it kept the list: its config.yaml's last start
    del state["trained_by"]
    assert pretrained_origin(run_dir / "checkpoint.pth", state)["trained_by"] == [clean]


def test_unreadable_files_met_before_a_stop_count_in_the_resumed_epoch(run_in_process, monkeypatch, tmp_path):
    """An image folder with 4 unreadable training files of 20, the limit 3 (15 % here): a run stopped after its
    first steps and resumed counted only the files met after the stop, and trained on past the limit."""
    import fabricate
    from clusterlab.data import loader, registry

    fabricate.make_imagefolder(tmp_path / "data", n_per_class=10, classes=2, size=8, grey=True)
    data = registry.load("imagefolder", "train", str(tmp_path / "data"))
    fabricate.spoil_image_files([data.files[i] for i in (1, 2, 15, 17)])
    monkeypatch.setattr(loader, "BAD_FILE_LIMIT", 0.15)
    folder = [*TINY, "--dataset", "imagefolder", "--data_path", tmp_path / "data", "--batch_size", 4,
              "--knn_monitor_every", 0, "--epochs", 1]
    straight = run_in_process("main_pretrain.py", *folder, "--output_dir", tmp_path / "straight")
    assert "4 unreadable image files in epoch 1" in straight.stderr
    signal_when(monkeypatch, "step", lambda trainer, batch, progress: progress.step == 2)
    stopped = run_in_process("main_pretrain.py", *folder, "--output_dir", tmp_path / "stopped")
    assert stopped.returncode == 75, stopped.stderr
    assert checkpoint.load(tmp_path / "stopped" / "checkpoint.pth")["bad_files"] > 0  # met before the stop
    monkeypatch.undo()
    monkeypatch.setattr(loader, "BAD_FILE_LIMIT", 0.15)
    resumed = run_in_process("main_pretrain.py", *folder, "--output_dir", tmp_path / "stopped")
    assert "4 unreadable image files in epoch 1" in resumed.stderr


def test_a_signal_at_the_last_step_of_the_run_finishes_it(run_in_process, monkeypatch, tmp_path):
    signal_when(monkeypatch, "step", lambda trainer, batch, progress: (progress.epoch, progress.step + 1) == (
        trainer.args.epochs - 1, trainer.steps_per_epoch))
    run_dir = tmp_path / "run"
    result = run_in_process("main_pretrain.py", *TINY, "--epochs", 1, "--output_dir", run_dir)
    assert result.returncode == 75, result.stderr
    assert "SIGUSR2 at the end of the last epoch: training is complete" in result.stdout
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"


def test_a_knn_monitor_without_test_data_is_refused_before_training(tmp_path):
    from fabricate import make_mixed_imagefolder

    make_mixed_imagefolder(tmp_path / "data", n_per_class=4, classes=2)
    shutil.rmtree(tmp_path / "data" / "test", ignore_errors=True)
    shutil.rmtree(tmp_path / "data" / "val", ignore_errors=True)
    run_dir = tmp_path / "run"
    result = run_script("main_pretrain.py", *TINY, "--dataset", "imagefolder", "--data_path", tmp_path / "data",
                        "--size_crops", 8, "--batch_size", 4, "--knn_monitor_every", 1, "--output_dir", run_dir)
    assert_user_error(result, "main_pretrain.py", "no val/ or test/ folder")
    assert not (run_dir / "train_log.jsonl").exists() and not (run_dir / "checkpoint.pth").exists()
    # without the monitor it trains, and says at start what its evaluations will need
    trained = run_script("main_pretrain.py", *TINY, "--dataset", "imagefolder", "--data_path", tmp_path / "data",
                         "--size_crops", 8, "--batch_size", 4, "--epochs", 1, "--output_dir", run_dir)
    assert trained.returncode == 0, trained.stderr
    assert (f"note: {tmp_path / 'data'} has no val/ or test/ folder: it trains, but eval_knn.py and eval_linear.py "
            f"need DATA_PATH/val/CLASS/ (the classes of train/); eval_cluster.py --split train scores the training "
            f"images") in trained.stdout
    # k-means fitted on and scoring the training split needs no test split (it was refused as if it did)
    scored = run_script("eval_cluster.py", "--run", run_dir, "--split", "train", "--clusters", 2, "--device", "cpu")
    assert scored.returncode == 0, scored.stderr
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert (record["eval"], record["split"], record["protocol"]["scored_images"]) == ("cluster", "train", 8)
    for needs_test in (["eval_cluster.py"], ["eval_cluster.py", "--split", "train", "--fit_on", "test"],
                       ["eval_knn.py"]):
        refused = run_script(*needs_test, "--run", run_dir, "--device", "cpu")
        assert_user_error(refused, needs_test[0], "no val/ or test/ folder")


def test_a_failure_after_the_run_finished_leaves_it_finished(run_in_process, monkeypatch, tmp_path):
    """A signal at the end of the last epoch is handed to the previous handler once the run is finished; submitit's
    raises when its requeues are used up. The run's training is complete: its status stays "finished"."""
    from clusterlab import signals

    def requeues_used_up():
        raise RuntimeError("the job has used up its requeues")

    signal_when(monkeypatch, "step", lambda trainer, batch, progress: (progress.epoch, progress.step + 1) == (
        trainer.args.epochs - 1, trainer.steps_per_epoch))
    monkeypatch.setattr(signals, "leave", requeues_used_up)
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="used up its requeues"):
        run_in_process("main_pretrain.py", *TINY, "--epochs", 1, "--output_dir", run_dir)
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"


def test_the_eta_of_a_resumed_epoch_counts_only_the_steps_this_start_ran(monkeypatch):
    """Resumed at step 900 (0-based) of 1000, one step a second: once it is done 1,099 steps are left (99 of this
    epoch, 1,000 of the next), not the 1 s that dividing the time by all 901 steps of the epoch gave."""
    trainer = engine.Trainer.__new__(engine.Trainer)
    trainer.args, trainer.steps_per_epoch = argparse.Namespace(epochs=2), 1000
    monkeypatch.setattr(time, "time", lambda: 1000.0)
    record = {"epoch": 0, "step": 900, "loss": 1.0, "lr": 0.1, "img_per_s": 5.0}
    assert trainer.progress_line(record, epoch_start=999.0, step=900, start_step=900).endswith("eta 0:18:19")
    assert trainer.progress_line(record, epoch_start=99.0, step=900).endswith("eta 0:18:19")
    # the learning rate in 5 significant digits: 5 decimals printed 1e-6 as 0.00000 and a diverging 4e29 in 36 digits
    rates = [trainer.progress_line({**record, "lr": lr}, 999.0, 900, 900).split(" lr ")[1].split()[0]
             for lr in (0.84706, 3e-4, 1e-6, 4.0579710144927538e29)]
    assert rates == ["0.84706", "0.0003", "1e-06", "4.058e+29"]


def test_a_resume_gives_back_the_global_generators_of_the_checkpoint(tmp_path):
    """torch's, numpy's and Python's global generators as the checkpoint left them (the SwAV runs compared bit for
    bit above draw nothing from them while they train, so only this catches a resume that forgets them)."""
    import random

    import numpy as np
    from test_amp import trainer_for

    first = trainer_for("swav", "off", tmp_path)
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    first.save(0, 0)
    expected = torch.rand(3), np.random.rand(3), random.random()
    resumed = trainer_for("swav", "off", tmp_path)
    torch.manual_seed(2), np.random.seed(2), random.seed(2)
    resumed.resume()
    drawn = torch.rand(3), np.random.rand(3), random.random()
    assert torch.equal(drawn[0], expected[0]) and np.array_equal(drawn[1], expected[1]) and drawn[2] == expected[2]

