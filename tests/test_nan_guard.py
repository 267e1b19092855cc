"""The NaN guard (engine.py): a non-finite loss stops the run with one line naming the epoch and step, exit status 2,
status.json "failed", and checkpoint.pth left exactly as the last completed epoch wrote it; non-finite weights at an
epoch's end, or finite ones whose features overflow, are not saved; and when checkpoint.pth itself holds the weights
that failed, the message says so."""
from __future__ import annotations

import json
import re

import pytest
import torch

from clusterlab import checkpoint, distributed, engine
from clusterlab.data import load
from clusterlab.methods import METHODS, DataInfo
from clusterlab.programs.train import parse_args
from conftest import TINY, assert_ok, assert_user_error, copy_run, run_script


def test_absurd_learning_rate_after_an_epoch_keeps_the_last_good_checkpoint(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    good = (run / "checkpoint.pth").read_bytes()
    log_lines = len((run / "train_log.jsonl").read_text().splitlines())
    # The same run continued for a third epoch with a learning rate no network survives.
    result = run_script("main_pretrain.py", *TINY, "--epochs", 3, "--lr", "1e30", "--warmup_epochs", 0,
                        "--log_every", 1, "--output_dir", run)
    line = assert_user_error(result, "main_pretrain.py", "loss is not finite at epoch 3 step",
                             "stopped without saving", f"the last good checkpoint is {run / 'checkpoint.pth'}")
    # counted as the progress lines count: the third epoch, its failing step from 1 (status.json: steps done)
    step = int(re.search(r"at epoch 3 step (\d+)/14 ", line).group(1)) - 1
    assert 0 < step < 898 // 64  # the first step's loss is computed before the absurd update
    assert (run / "checkpoint.pth").read_bytes() == good
    assert checkpoint.load(run / "checkpoint.pth")["epoch"] == 2
    status = json.loads((run / "status.json").read_text())
    assert (status["state"], status["epoch"], status["step"], status["reason"]) == ("failed", 2, step,
                                                                                    "NonFiniteLoss: " + line.split(": error: ", 1)[1])
    logged = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()[log_lines:]]
    assert [r["step"] for r in logged] == list(range(step))  # nothing logged for the bad step or after it
    assert not list(run.glob(".*.tmp"))


def test_non_finite_loss_in_the_first_epoch_writes_no_checkpoint(tmp_path):
    run = tmp_path / "run"
    result = run_script("main_pretrain.py", *TINY, "--lr", "1e30", "--warmup_epochs", 0, "--output_dir", run)
    assert_user_error(result, "main_pretrain.py", "loss is not finite at epoch 1 step",
                      "the last good checkpoint is none (no epoch finished)")
    assert not (run / "checkpoint.pth").exists()
    assert json.loads((run / "status.json").read_text())["state"] == "failed"


@pytest.mark.parametrize("flags, hint", [
    ([*TINY, "--epsilon", "0.001"], "(--epsilon 0.001 is small enough for the Sinkhorn to underflow in float32: raise it, or "
                             "compute it with --sinkhorn_dtype float64)"),
    (["--method", "npid", "--dataset", "digits", "--width", "4", "--embed_dim", "16", "--batch_size", "64",
      "--size_crops", "8", "--device", "cpu", "--nce_k", "100", "--bank_t", "1e-4"],
     "(--bank_t 0.0001 makes NCE's exp(similarity / bank_t) overflow float32: raise it (above 1/88), or train the "
     "full softmax (--nce_k 0))"),
], ids=["swav-epsilon", "npid-nce-temperature"])
def test_a_loss_a_flag_made_non_finite_names_the_flag(tmp_path, flags, hint):
    """The stop named the epoch, the step and the loss terms (swav=nan) but not the flag that overflowed them."""
    result = run_script("main_pretrain.py", *flags, "--output_dir", tmp_path / "run")
    line = assert_user_error(result, "main_pretrain.py", "loss is not finite at epoch 1 step 1/")
    assert f") {hint}; stopped without saving" in line, line  # (after the terms it explains)


@pytest.mark.parametrize("method, monitor", [("swav", 1), ("npid", 0)])
def test_weights_a_last_update_blew_up_are_not_saved_over_the_last_good_checkpoint(tmp_path, method, monitor):
    """One step per epoch (batch = the 898 digits): the second epoch's update with an absurd learning rate leaves
    finite but enormous weights, whose features overflow. They were saved over the first epoch's checkpoint.pth, and
    the run, resumed, failed at its first step for good; the save refuses them now, and going on works. A kNN monitor
    of them is not logged (chance, drawn in the run's curves)."""
    run = tmp_path / "run"
    base = TINY if method == "swav" else ["--method", method, "--dataset", "digits", "--width", 4, "--device", "cpu"]
    whole_batch = [*base, "--batch_size", 898, "--knn_monitor_every", monitor, "--output_dir", run]
    assert_ok(run_script("main_pretrain.py", *whole_batch, "--epochs", 1))
    good = (run / "checkpoint.pth").read_bytes()
    result = run_script("main_pretrain.py", *whole_batch, "--epochs", 3, "--lr", "1e30", "--warmup_epochs", 0)
    assert_user_error(result, "main_pretrain.py", "the weights at the end of epoch 2 overflow: the backbone's "
                      "features of 8 of 8 images of noise are not finite (finite weights", "stopped without saving",
                      f"the last good checkpoint is {run / 'checkpoint.pth'}")
    assert (run / "checkpoint.pth").read_bytes() == good
    monitored = [json.loads(line)["epoch"] for line in (run / "train_log.jsonl").read_text().splitlines()
                 if "knn_monitor" in line]
    assert monitored == ([0] if monitor else [])
    assert_ok(run_script("main_pretrain.py", *whole_batch, "--epochs", 3))
    assert json.loads((run / "status.json").read_text())["state"] == "finished"


def test_a_stop_after_a_diverged_update_saves_nothing_and_names_the_epoch_checkpoint_before(tmp_path):
    """A stop signal pending when the last update made the weights non-finite: no checkpoint of them (a requeue would
    only fail again). checkpoint_ep0001.pth, from the start of the epoch checkpoint.pth stands in, is named."""
    args = parse_args("pretrain", [*TINY, "--checkpoint_epochs", "1", "--output_dir", str(tmp_path / "run")])
    train = load("digits", "train")
    method = METHODS["swav"](args, DataInfo.of(train), torch.device("cpu"))
    (tmp_path / "run").mkdir()
    trainer = engine.Trainer(method, args, distributed.init("cpu"), tmp_path / "run", train)
    trainer.end_of_epoch(0)                      # checkpoint.pth and checkpoint_ep0001.pth at (1, 0)
    trainer.position = (1, 3)
    trainer.save(1, 3)                           # a mid-epoch checkpoint.pth, as a stop signal leaves
    kept = (tmp_path / "run" / "checkpoint.pth").read_bytes()
    trainer.position = (1, 5)
    with torch.no_grad():
        next(method.parameters())[0] = float("inf")
    with pytest.raises(engine.NonFiniteLoss, match="not finite at epoch 2 step 5/14 .*the last good checkpoint is "
                                                   ".*checkpoint.pth"):
        trainer.save_and_requeue()
    assert (tmp_path / "run" / "checkpoint.pth").read_bytes() == kept
    trainer.position = (1, 3)                    # a loss failing at the very step checkpoint.pth stands at
    with pytest.raises(engine.NonFiniteLoss, match="fails again; the last good one is .*checkpoint_ep0001.pth"):
        trainer.fail_on_nonfinite(1, 3, {})


def test_non_finite_weights_at_the_end_of_an_epoch_are_not_saved(tmp_path):
    args = parse_args("pretrain", [*TINY, "--output_dir", str(tmp_path / "run")])
    train = load("digits", "train")
    method = METHODS["swav"](args, DataInfo.of(train), torch.device("cpu"))
    (tmp_path / "run").mkdir()
    trainer = engine.Trainer(method, args, distributed.init("cpu"), tmp_path / "run", train)
    trainer.end_of_epoch(0)
    good = (tmp_path / "run" / "checkpoint.pth").read_bytes()
    with torch.no_grad():
        next(method.parameters())[0] = float("nan")
    with pytest.raises(engine.NonFiniteLoss, match="the weights are not finite at the end of epoch 2 .* stopped without "
                                                   "saving, the last good checkpoint is .*checkpoint.pth"):
        trainer.end_of_epoch(1)
    assert (tmp_path / "run" / "checkpoint.pth").read_bytes() == good
    # a batch-norm statistic counts too: evaluations read it, and refuse a checkpoint that holds one
    with torch.no_grad():
        next(method.parameters())[0] = 0.0
        next(b for b in method.buffers() if b.is_floating_point())[0] = float("inf")
    with pytest.raises(engine.NonFiniteLoss, match="the weights are not finite at the end of epoch 3"):
        trainer.end_of_epoch(2)
    assert (tmp_path / "run" / "checkpoint.pth").read_bytes() == good


def test_a_scan_step_that_diverges_stops_with_the_one_line_message(tiny_run, tmp_path, run_in_process):
    """SCAN's consistency is torch's binary cross-entropy, which raised on the NaN similarities of a diverged step
    (a traceback, status.json "failed" with torch's words) before the guard could see a non-finite loss."""
    run = tmp_path / "scan"
    result = run_in_process("main_cluster.py", "--method", "scan", "--dataset", "digits", "--width", 4, "--device",
                            "cpu", "--pretrained", tiny_run, "--epochs", 1, "--lr", "1e30", "--warmup_epochs", 0,
                            "--output_dir", run)
    assert_user_error(result, "main_cluster.py", "loss is not finite at epoch 1 step",
                      "the last good checkpoint is none (no epoch finished)")
    assert json.loads((run / "status.json").read_text())["reason"].startswith(
        "NonFiniteLoss: loss is not finite at epoch 1 step ")


def test_weights_that_overflow_only_on_real_images_stop_at_the_knn_monitor(tmp_path):
    """The trainer's overflow probe feeds noise; weights may overflow on the real images only. The monitor then
    scored NaN rows (zero rows before), logged chance and saved the weights: now it stops the run as the probe
    does, before the save."""
    args = parse_args("pretrain", [*TINY, "--knn_monitor_every", "1", "--output_dir", str(tmp_path / "run")])
    train = load("digits", "train")
    method = METHODS["swav"](args, DataInfo.of(train), torch.device("cpu"))
    (tmp_path / "run").mkdir()
    trainer = engine.Trainer(method, args, distributed.init("cpu"), tmp_path / "run", train)
    trainer.monitor_set = load("digits", "test")
    trainer.end_of_epoch(0)
    good = (tmp_path / "run" / "checkpoint.pth").read_bytes()
    embedding = method.embedding

    def overflowing_on_the_third_image(images):
        out = embedding(images).clone()
        out[2:3] = float("inf")
        return out

    method.embedding = overflowing_on_the_third_image
    with pytest.raises(engine.NonFiniteLoss, match=r"^the weights at the end of epoch 2 overflow on real images: the "
                                                   r"kNN monitor's embeddings of \d+ images are not finite .*stopped "
                                                   r"without saving, the last good checkpoint is .*checkpoint.pth$"):
        trainer.end_of_epoch(1)
    assert (tmp_path / "run" / "checkpoint.pth").read_bytes() == good
    log = (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in log if "knn_monitor" in line] == [0]


def test_a_linear_probe_that_diverges_names_its_learning_rate(tiny_run, tmp_path):
    """`--lr 1e30`: the probe stopped with the loss terms (ce=nan) and no flag to change."""
    run = copy_run(tiny_run, tmp_path / "run")
    result = run_script("eval_linear.py", "--run", run, "--lr", "1e30", "--epochs", 2, "--cached_features", "true",
                        "--device", "cpu")
    line = assert_user_error(result, "eval_linear.py", "loss is not finite at epoch 1 step ")
    assert ("(the probe is one linear layer on a frozen backbone, so its optimisation diverged: lower --lr (here "
            "1e+30)); stopped without saving") in line, line
    assert not (run / "metrics.jsonl").exists() or "linear" not in (run / "metrics.jsonl").read_text()
