"""The NaN guard (engine.py): a non-finite loss stops the run with one line naming the epoch and step, exit status 2,
status.json "failed", and checkpoint.pth left exactly as the last completed epoch wrote it."""
from __future__ import annotations

import json
import re

from clusterlab import checkpoint
from conftest import TINY, assert_user_error, copy_run, run_script


def test_absurd_learning_rate_after_an_epoch_keeps_the_last_good_checkpoint(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    good = (run / "checkpoint.pth").read_bytes()
    log_lines = len((run / "train_log.jsonl").read_text().splitlines())
    # The same run continued for a third epoch with a learning rate no network survives.
    result = run_script("main_pretrain.py", *TINY, "--epochs", 3, "--lr", "1e30", "--warmup_epochs", 0,
                        "--log_every", 1, "--output_dir", run)
    line = assert_user_error(result, "main_pretrain.py", "loss is not finite at epoch 2 step",
                             "stopped without saving", f"the last good checkpoint is {run / 'checkpoint.pth'}")
    step = int(re.search(r"at epoch 2 step (\d+)", line).group(1))
    assert 0 < step < 898 // 64  # the first step's loss is computed before the absurd update
    assert (run / "checkpoint.pth").read_bytes() == good
    assert checkpoint.load(run / "checkpoint.pth")["epoch"] == 2
    status = json.loads((run / "status.json").read_text())
    assert (status["state"], status["epoch"], status["step"], status["reason"]) == ("failed", 2, step,
                                                                                    "non-finite loss")
    logged = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()[log_lines:]]
    assert [r["step"] for r in logged] == list(range(step))  # nothing logged for the bad step or after it
    assert not list(run.glob(".*.tmp"))


def test_non_finite_loss_in_the_first_epoch_writes_no_checkpoint(tmp_path):
    run = tmp_path / "run"
    result = run_script("main_pretrain.py", *TINY, "--lr", "1e30", "--warmup_epochs", 0, "--output_dir", run)
    assert_user_error(result, "main_pretrain.py", "loss is not finite at epoch 0 step",
                      "the last good checkpoint is none (no epoch finished)")
    assert not (run / "checkpoint.pth").exists()
    assert json.loads((run / "status.json").read_text())["state"] == "failed"
