"""A resume under changed flags: those outside the run-defining keys may change, but never silently, and method state
the checkpoint holds is never dropped without a word."""
from __future__ import annotations

import pytest
import torch
import yaml

from clusterlab import distributed, engine
from clusterlab.data import load
from clusterlab.errors import CheckpointError
from clusterlab.methods import METHODS, DataInfo
from clusterlab.programs.train import parse_args
from conftest import TINY, assert_ok, run_script

SWAV = [*TINY, "--epochs", "1", "--batch_size", "32", "--queue_length", "64", "--epoch_queue_starts", "0"]
SELFCLASSIFIER = ["--method", "selfclassifier", "--dataset", "digits", "--width", "4", "--batch_size", "32",
                  "--size_crops", "8", "--epochs", "1", "--head_classes", "10", "--hidden_dim", "32", "--embed_dim",
                  "16", "--queue_length", "64", "--device", "cpu"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_flags")
    assert_ok(run_script("main_pretrain.py", *SWAV, "--output_dir", root / "swav"))
    assert_ok(run_script("main_cluster.py", *SELFCLASSIFIER, "--output_dir", root / "selfclassifier"))
    return root


def resumed(kind: str, flags: list, run_dir) -> engine.Trainer:
    args = parse_args(kind, [*map(str, flags), "--output_dir", str(run_dir)])
    train = load("digits", "train")
    trainer = engine.Trainer(METHODS[args.method](args, DataInfo.of(train), torch.device("cpu")), args,
                             distributed.init("cpu"), run_dir, train, kind=kind)
    trainer.resume()
    return trainer


def test_a_changed_loss_flag_is_said_and_recorded(runs):
    trainer = resumed("pretrain", [*SWAV, "--epochs", "2", "--temperature", "0.5", "--epsilon", "0.05"],
                      runs / "swav")
    assert any("--temperature 0.1 -> 0.5, --epsilon 0.02 -> 0.05" in note for note in trainer.resume_notes), \
        trainer.resume_notes
    assert trainer.resume_changes[-1]["before"] == {"epochs": 1, "temperature": 0.1, "epsilon": 0.02}
    assert trainer.resume_changes[-1]["after"] == {"epochs": 2, "temperature": 0.5, "epsilon": 0.05}


def test_flags_that_change_nothing_learnt_are_not_reported(runs):
    trainer = resumed("pretrain", [*SWAV, "--epochs", "2", "--log_every", "3", "--workers", "0"], runs / "swav")
    assert trainer.resume_changes[-1]["before"] == {"epochs": 1}


@pytest.mark.parametrize("kind, flags, run", [("pretrain", SWAV, "swav"),
                                              ("cluster", SELFCLASSIFIER, "selfclassifier")])
def test_a_queue_the_checkpoint_holds_is_not_dropped(runs, kind, flags, run):
    with pytest.raises(CheckpointError, match=r"holds 64 embeddings.*--queue_length 0"):
        resumed(kind, [*flags, "--epochs", "2", "--queue_length", "0"], runs / run)


def test_a_queue_start_moved_later_on_resume_is_applied(runs, tmp_path):
    """Resumed with a later --epoch_queue_starts, a note said the run went on with it (and that the queue never
    starts), while the checkpoint's full queue took part in every step after the resume."""
    run = tmp_path / "swav"
    run.mkdir()
    (run / "checkpoint.pth").write_bytes((runs / "swav" / "checkpoint.pth").read_bytes())
    assert torch.load(run / "checkpoint.pth", weights_only=True)["method_state"]["queue"] is not None
    result = run_script("main_pretrain.py", *SWAV, "--epochs", "2", "--epoch_queue_starts", "5", "--output_dir", run)
    assert_ok(result)
    assert "the queue never starts (--epoch_queue_starts 5 >= --epochs 2)" in result.stdout
    state = torch.load(run / "checkpoint.pth", weights_only=True)
    assert state["epoch"] == 2 and state["method_state"]["queue"] is None


def test_epoch_checkpoints_asked_for_behind_the_resume_point_are_named(runs, tmp_path):
    """--checkpoint_epochs 1 added on resuming a run at epoch 1, mid-epoch 2, ...: an epoch the run is past was left
    out without a word (the epoch checkpoint.pth stands at is copied from it); one written before is not named."""
    trainer = resumed("pretrain", [*SWAV, "--epochs", "3", "--checkpoint_epochs", "1", "3"], runs / "swav")
    assert not any("--checkpoint_epochs" in note for note in trainer.resume_notes)  # epoch 1: copied at the start
    run = tmp_path / "run"
    assert_ok(run_script("main_pretrain.py", *SWAV, "--epochs", "2", "--output_dir", run))
    trainer = resumed("pretrain", [*SWAV, "--epochs", "4", "--checkpoint_epochs", "1", "2", "3"], run)
    assert "--checkpoint_epochs 1: behind checkpoint.pth (the end of epoch 2), never written" in trainer.resume_notes
    (run / "checkpoint_ep0001.pth").write_bytes((run / "checkpoint.pth").read_bytes())
    trainer = resumed("pretrain", [*SWAV, "--epochs", "4", "--checkpoint_epochs", "1", "2", "3"], run)
    assert not any("--checkpoint_epochs" in note for note in trainer.resume_notes)


def test_a_finished_run_whose_config_records_a_start_that_saved_nothing_gets_its_record_back(runs, tmp_path):
    """Resumed with other flags, a start that failed before its first checkpoint (here a NaN at its first step)
    left config.yaml recording its flags and a resume change no checkpoint went through; the original command then
    said "nothing to train (config.yaml keeps the flags and code it trained with)" over that record."""
    run = tmp_path / "run"
    assert_ok(run_script("main_pretrain.py", *SWAV, "--output_dir", run))
    before = yaml.safe_load((run / "config.yaml").read_text())
    failed = run_script("main_pretrain.py", *SWAV, "--epochs", "2", "--lr", "1e30", "--output_dir", run)
    assert failed.returncode != 0 and yaml.safe_load((run / "config.yaml").read_text())["args"]["lr"] == 1e30
    again = run_script("main_pretrain.py", *SWAV, "--output_dir", run)
    assert_ok(again)
    assert "config.yaml recorded a start that saved no checkpoint" in again.stdout
    after = yaml.safe_load((run / "config.yaml").read_text())
    assert after["args"] == before["args"] and after["resume_changes"] == [] == before["resume_changes"]
    assert [after[key] for key in ("trained_by", "precision", "training_set", "git_commit")] == [
        before[key] for key in ("trained_by", "precision", "training_set", "git_commit")]
    quiet = run_script("main_pretrain.py", *SWAV, "--output_dir", run)  # the record is whole: nothing to say
    assert_ok(quiet)
    assert "saved no checkpoint" not in quiet.stdout and yaml.safe_load((run / "config.yaml").read_text()) == after


@pytest.mark.parametrize("saved_sync_bn, sync_bn, recorded", [("true", "true", False), ("false", "false", True),
                                                              ("false", "true", True), ("true", "false", True)])
def test_a_resume_on_another_number_of_processes_is_said(runs, tmp_path, saved_sync_bn, sync_bn, recorded):
    """The checkpoint keeps the world size that wrote it; a resume on another one says so, and records it where the
    steps depend on it (local batch norm, Un-Mix's per-rank pairs): also where local batch norm trained the
    checkpoint only (resumed with --sync_bn true), whose epochs the tables filed under no number of processes."""
    from clusterlab import checkpoint
    from conftest import copy_run

    run_dir = copy_run(runs / "swav", tmp_path / "run")
    state = checkpoint.load(run_dir / "checkpoint.pth")
    state["world_size"], state["args"]["sync_bn"] = 2, saved_sync_bn == "true"
    tags = ("format", "schema", "kind", "method")
    checkpoint.save({k: v for k, v in state.items() if k not in tags}, run_dir / "checkpoint.pth", kind="pretrain",
                    method="swav")
    trainer = resumed("pretrain", [*SWAV, "--epochs", "2", "--sync_bn", sync_bn], run_dir)
    assert any("resumed on 1 process(es); the checkpoint was written by 2" in note for note in trainer.resume_notes)
    assert ("world_size" in trainer.resume_changes[-1]["before"]) == recorded


def test_a_std_given_alone_is_the_one_trained_with_on_resume_and_on_a_pretrained_run(tiny_run, tmp_path):
    """--std without --mean was dropped on resume and under --pretrained (the saved pair went on), while config.yaml
    and resume_changes recorded the new std as applied; each of the two given now replaces the saved one."""
    from clusterlab import checkpoint
    from conftest import copy_run

    run = copy_run(tiny_run, tmp_path / "run")
    saved = checkpoint.load(run / "checkpoint.pth")["data_info"]
    assert_ok(run_script("main_pretrain.py", *TINY, "--epochs", "3", "--std", "0.3", "--output_dir", run))
    info = checkpoint.load(run / "checkpoint.pth")["data_info"]
    assert (list(info["mean"]), list(info["std"])) == (list(saved["mean"]), [0.3])
    scan = tmp_path / "scan"
    assert_ok(run_script("main_cluster.py", "--method", "scan", "--dataset", "digits", "--width", "4", "--batch_size",
                         "64", "--size_crops", "8", "--epochs", "1", "--device", "cpu", "--pretrained", tiny_run,
                         "--std", "0.3", "--output_dir", scan))
    info = checkpoint.load(scan / "checkpoint.pth")["data_info"]
    assert (list(info["mean"]), list(info["std"])) == (list(saved["mean"]), [0.3])
    # resumed without --pretrained it goes on with the statistics its config.yaml records: it said they changed to
    # none (and the tables made it a recipe of its own), while it trained with them
    resumed = run_script("main_cluster.py", "--method", "scan", "--dataset", "digits", "--width", "4", "--batch_size",
                         "64", "--size_crops", "8", "--epochs", "2", "--device", "cpu", "--output_dir", scan)
    assert_ok(resumed)
    assert "--mean" not in resumed.stdout and "--std" not in resumed.stdout
    config = yaml.safe_load((scan / "config.yaml").read_text())
    assert (config["args"]["mean"], config["args"]["std"]) == (list(saved["mean"]), [0.3])
    assert "std" not in str(config.get("resume_changes"))


def test_a_resume_reading_another_folder_says_so(tmp_path):
    """The same file names and labels in another folder (a moved copy, or a resized one: pixels are not compared)
    pass the resume's fingerprint check; the run went on without a word while config.yaml took the new path."""
    import shutil
    import subprocess

    import fabricate
    from conftest import PYTHON, ROOT, script_env

    first = fabricate.make_fashion_mnist(tmp_path / "first", n_train=64, n_test=20, seed=4)
    second = shutil.copytree(first, tmp_path / "second")
    flags = [*TINY, "--dataset", "fashion_mnist", "--batch_size", "32", "--output_dir", tmp_path / "run"]
    assert_ok(run_script("main_pretrain.py", *flags, "--epochs", "1", "--data_path", first))
    resumed = run_script("main_pretrain.py", *flags, "--epochs", "2", "--data_path", second)
    assert_ok(resumed)
    assert (f"note: --data_path {str(second)!r} reads {second}; the checkpoint trained on {first}: the files have "
            f"the same names and labels, so the run goes on") in resumed.stdout, resumed.stdout
    # the same folder named from another working directory is the same folder
    again = subprocess.run([PYTHON, str(ROOT / "main_pretrain.py"), *map(str, flags), "--epochs", "3",
                            "--data_path", "second"], cwd=tmp_path, env=script_env(), capture_output=True, text=True)
    assert_ok(again)
    assert "--data_path" not in again.stdout, again.stdout


def test_a_flag_that_neither_schedule_reads_is_no_change_on_resume(runs, tmp_path):
    """A run without warm-up trained under a config giving --start_warmup (since refused as unread there) and resumed
    under one that no longer gives it: a false 'the schedule changed' note, and resume_changes that kept its later
    checkpoints from published numbers."""
    from clusterlab import checkpoint
    from conftest import copy_run

    run_dir = copy_run(runs / "swav", tmp_path / "run")
    state = checkpoint.load(run_dir / "checkpoint.pth")
    state["args"].update(warmup_epochs=0.0, start_warmup=0.25)
    tags = ("format", "schema", "kind", "method")
    checkpoint.save({k: v for k, v in state.items() if k not in tags}, run_dir / "checkpoint.pth", kind="pretrain",
                    method="swav")
    trainer = resumed("pretrain", [*SWAV, "--epochs", "2", "--warmup_epochs", "0"], run_dir)
    assert trainer.resume_changes[-1]["before"] == {"epochs": 1}, trainer.resume_notes
