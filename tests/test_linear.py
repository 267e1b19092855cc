"""The linear probe: it learns a linearly separable problem, and its two protocols are recorded apart."""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml

from clusterlab import distributed, engine
from clusterlab.data.augment import EvalView
from clusterlab.eval.features import Evaluation
from clusterlab.eval.linear import FeatureSet, LinearProbe, topk_accuracy
from clusterlab.methods import DataInfo
from clusterlab.methods.base import Batch, Progress
from clusterlab.programs import eval_linear
from conftest import copy_run

ROOT = Path(__file__).resolve().parents[1]


def separable(n_per_class: int, classes: int, dim: int, seed: int):
    """Gaussian blobs around orthogonal means, far apart: a linear classifier can reach 100 %."""
    generator = torch.Generator().manual_seed(seed)
    means = 4.0 * torch.eye(classes, dim)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    features = means[labels] + 0.5 * torch.randn(len(labels), dim, generator=generator)
    return features, labels


def test_linear_probe_learns_linearly_separable_features(tmp_path):
    torch.set_num_threads(1)
    train_x, train_y = separable(100, 5, 16, seed=0)
    test_x, test_y = separable(40, 5, 16, seed=1)
    args = eval_linear.get_args_parser().parse_args(["--epochs", "10", "--batch_size", "50", "--lr", "0.1",
                                                     "--device", "cpu"])
    args = argparse.Namespace(**{**vars(args), "method": "linear", "checkpoint_epochs": [], "dataset": "synthetic",
                                 "arch": "identity", "width": 0, "nmb_crops": [1], "size_crops": [1],
                                 "output_dir": str(tmp_path / "probe")})
    ctx = distributed.init("cpu")
    (tmp_path / "probe").mkdir()
    info = DataInfo(channels=1, image_size=1, num_samples=len(train_y), num_classes=5, mean=(0.0,), std=(1.0,))
    probe = LinearProbe(args, nn.Identity(), info, 16, 5, 1, cached=True, device=ctx.device)
    trainer = engine.Trainer(probe, args, ctx, tmp_path / "probe", FeatureSet(train_x, train_y), kind="linear")
    for epoch in range(args.epochs):
        trainer.train_one_epoch(epoch)
    probe.eval()
    with torch.no_grad():
        accuracy = topk_accuracy(probe.head(test_x), test_y)
    assert accuracy["top1"] >= 0.99, accuracy


def test_the_probe_classifies_in_float32_under_amp(tmp_path):
    """--amp puts the frozen backbone in bf16 or fp16; the classifier and its loss stay float32, as every method's
    heads do (in bf16 the logits would lose all but 8 bits)."""
    features, labels = separable(8, 5, 16, seed=0)
    args = eval_linear.get_args_parser().parse_args(["--device", "cpu"])
    info = DataInfo(channels=1, image_size=1, num_samples=len(labels), num_classes=5, mean=(0.0,), std=(1.0,))
    probe = LinearProbe(args, nn.Identity(), info, 16, 5, 1, cached=True, device=torch.device("cpu"))
    nn.init.normal_(probe.head.weight, std=1.0, generator=torch.Generator().manual_seed(0))
    batch = Batch(features, labels, torch.arange(len(labels)), len(labels), 0)
    exact, _ = probe(features, batch, Progress(0, 0, 0, 1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_amp, _ = probe(features, batch, Progress(0, 0, 0, 1))
    assert under_amp.dtype == torch.float32
    assert torch.equal(under_amp, exact)


def test_cached_and_augmented_protocols_write_distinct_records(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    run = tmp_path / "run"
    subprocess.run([sys.executable, "main_pretrain.py", "--config", "configs/swav_digits.yaml", "--epochs", "1",
                    "--width", "4", "--hidden_mlp", "32", "--feat_dim", "16", "--size_crops", "8", "--device", "cpu",
                    "--output_dir", str(run)], cwd=ROOT, env=env, check=True, capture_output=True)
    for cached in ("true", "false", "true"):
        done = subprocess.run([sys.executable, "eval_linear.py", "--run", str(run), "--epochs", "2", "--batch_size",
                               "64", "--cached_features", cached, "--skip_recorded", "true", "--device", "cpu"],
                              cwd=ROOT, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    assert "already recorded" in done.stdout  # the third call repeats the first
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["eval"] for r in records] == ["linear", "linear"]
    assert [r["protocol"]["augmentation"] for r in records] == ["cached", "augmented"]
    probes = ("linear_ep0001_cached_batch_size64_epochs2", "linear_ep0001_batch_size64_epochs2")
    for record, probe in zip(records, probes):
        assert record["protocol"]["selection"] == "last" and record["protocol"]["best_on_test_flagged"] is True
        # the code of the probe's every start, for the tables' revision
        assert record["trained_by"] == yaml.safe_load((run / probe / "config.yaml").read_text())["trained_by"]
        metrics = record["metrics"]
        assert set(metrics) == {"top1", "top5", "best_top1_on_test", "best_epoch_on_test"}
        assert metrics["best_top1_on_test"] >= metrics["top1"] and 1 <= metrics["best_epoch_on_test"] <= 2
    # named by the weights' epoch, the protocol and the flags that differ from the defaults
    assert (run / "linear_ep0001_cached_batch_size64_epochs2" / "checkpoint.pth").is_file()
    assert (run / "linear_ep0001_batch_size64_epochs2" / "checkpoint.pth").is_file()


def test_a_probe_is_trained_afresh_for_other_weights_or_another_optimisation(tmp_path):
    """checkpoint.pth moves on as a run trains: the probe of its earlier weights is not resumed for the new ones (nor
    its record taken for theirs), and a probe with another learning rate is a probe of its own. The probe keeps
    only its head: the backbone is the run's."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    run = tmp_path / "run"
    train = [sys.executable, "main_pretrain.py", "--config", "configs/swav_digits.yaml", "--width", "4",
             "--hidden_mlp", "32", "--feat_dim", "16", "--size_crops", "8", "--device", "cpu", "--output_dir", str(run)]

    def probe(*flags):
        done = subprocess.run([sys.executable, "eval_linear.py", "--run", str(run), "--epochs", "1", "--batch_size",
                               "64", "--cached_features", "true", "--skip_recorded", "true", "--device", "cpu", *flags],
                              cwd=ROOT, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout

    probed = "_batch_size64_epochs1"
    subprocess.run([*train, "--epochs", "1"], cwd=ROOT, env=env, check=True, capture_output=True)
    probe()
    assert "already recorded" not in probe("--lr", "0.1")
    subprocess.run([*train, "--epochs", "2"], cwd=ROOT, env=env, check=True, capture_output=True)
    assert "epoch 1/1: test top1" in probe()  # trained, not found finished
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["protocol"]["lr"]) for r in records] == [(1, 0.3), (1, 0.1), (2, 0.3)]
    assert sorted(p.name for p in run.glob("linear_*")) == [f"linear_ep0001_cached{probed}",
                                                           f"linear_ep0001_cached{probed}_lr0.1",
                                                           f"linear_ep0002_cached{probed}"]
    head = torch.load(run / f"linear_ep0002_cached{probed}" / "checkpoint.pth", weights_only=True)["model"]
    assert sorted(head) == ["bias", "weight"]
    # Any other optimisation flag and the seed are in the protocol: a record of the defaults does not stand for them.
    assert "epoch 1/1: test top1" in probe("--momentum", "0.0")
    assert records_of(run)[-1]["protocol"]["momentum"] == 0.0 and "momentum" not in records_of(run)[0]["protocol"]
    # and so is the precision that ran (bf16 gives other numbers): not taken for the float32 probe, nor resumed from
    # it; --amp auto on the CPU is float32, the default probe's
    assert "already recorded" in probe("--amp", "auto")
    assert "epoch 1/1: test top1" in probe("--amp", "bf16")
    assert records_of(run)[-1]["protocol"]["precision"] == "bf16" and "precision" not in records_of(run)[0]["protocol"]
    assert (run / f"linear_ep0002_cached{probed}_bf16").is_dir()
    # Another directory's checkpoint (here a copy of the same epoch) gets a probe of its own, not the run's
    # finished one, and a record under its full path.
    other = tmp_path / "other"
    shutil.copytree(run, other, ignore=shutil.ignore_patterns("linear_*", "metrics.jsonl"))
    assert "epoch 1/1: test top1" in probe("--checkpoint", other / "checkpoint.pth")
    assert records_of(run)[-1]["checkpoint"] == str((other / "checkpoint.pth").resolve())
    assert len(list(run.glob(f"linear_ep0002_cached{probed}_from*"))) == 1


def records_of(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("amp, seen", [("bf16", torch.bfloat16), ("off", None)])
def test_test_features_are_computed_in_the_precision_the_probe_trains_in(tiny_run, tmp_path, monkeypatch, amp, seen):
    """Under --amp the probe's training images pass the frozen backbone under autocast; its test features were
    computed in float32, so the head was scored on other features than it learnt from."""
    run = copy_run(tiny_run, tmp_path / "run")
    from clusterlab.eval import features

    extract, precisions = features.extract, []

    def recording(*args, **kwargs):
        precisions.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return extract(*args, **kwargs)

    monkeypatch.setattr(features, "extract", recording)
    torch.set_num_threads(1)
    eval_linear.main(["--run", str(run), "--epochs", "1", "--device", "cpu", "--amp", amp])
    assert precisions == [seen]  # the test split's features (the augmented protocol extracts no train features)


def test_a_probe_resumed_through_another_path_to_its_run_records_no_change(tiny_run, tmp_path, monkeypatch, capsys):
    """--run, --checkpoint and --skip_recorded name the weights and what to skip, not how the probe learns: a probe
    stopped mid-run and resumed by hand, through another path to its run, said its flags had changed and wrote
    resume_changes into its config.yaml."""
    from clusterlab import signals

    run = copy_run(tiny_run, tmp_path / "run")
    probe = ["--epochs", "2", "--batch_size", "64", "--cached_features", "true", "--device", "cpu"]
    with monkeypatch.context() as stopping:
        stopping.setattr(signals, "received", lambda: signal.SIGUSR2)  # at the end of the first step
        with pytest.raises(SystemExit) as stopped:
            eval_linear.main(["--run", str(run), "--skip_recorded", "true", *probe])
    assert stopped.value.code == 75
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    eval_linear.main(["--run", "run/../run", "--checkpoint", "checkpoint_ep0002.pth", *probe])
    assert "changed" not in capsys.readouterr().out
    # the run's own test view asked for by name is the same probe (its folder): it said "--eval_crop 0 -> 8 not
    # applied: a new --output_dir trains them", a flag eval_linear.py does not have, of the view it had applied
    eval_linear.main(["--run", "run", "--eval_crop", "8", *probe])
    out = capsys.readouterr().out
    assert ("has trained its 2 epochs: nothing to train (config.yaml keeps the flags and code it trained with)\n"
            in out and "not applied" not in out), out
    (probe_dir,) = run.glob("linear_*")
    assert yaml.safe_load((probe_dir / "config.yaml").read_text())["resume_changes"] == []


def test_probe_folders_of_values_that_differ_by_their_exponents_sign_differ(tmp_path):
    """Characters a folder name should not hold became "-", so that --lr_gamma 1e+20 trained in the folder of
    --lr_gamma 1e-20 (and the second was refused as a resume with other flags)."""
    args = argparse.Namespace(eval_crop=0, eval_resize=0, cached_features=True)
    loaded = argparse.Namespace(epoch=2, step=0, checkpoint_name="checkpoint.pth", run_dir=tmp_path,
                                args=argparse.Namespace(dataset="digits"))
    names = {eval_linear.probe_dir(args, loaded, "digits", {"precision": None}, {"lr_gamma": gamma},
                                   EvalView(16, 16)).name for gamma in (1e20, 1e-20)}
    assert names == {"linear_ep0002_cached_lr_gamma1e20", "linear_ep0002_cached_lr_gamma1e-20"}


def test_the_runs_own_test_view_asked_for_by_name_is_the_same_probe(tmp_path):
    """--eval_crop / --eval_resize at the run's own test view (ImageNet's 224 of 256) trained a second, identical
    probe in a folder of its own (_crop224, _resize256)."""
    loaded = argparse.Namespace(epoch=2, step=0, checkpoint_name="checkpoint.pth", run_dir=tmp_path,
                                args=argparse.Namespace(dataset="imagefolder"))

    def folder(crop, resize=0, own=EvalView(224, 256), own_resize=256):
        args = argparse.Namespace(eval_crop=crop, eval_resize=resize, cached_features=True)
        return eval_linear.probe_dir(args, loaded, "imagefolder", {"precision": None}, {}, own, own_resize).name
    assert folder(224) == folder(0) == folder(0, 256) == folder(224, 256) == "linear_ep0002_cached"
    assert folder(192) == folder(192, 256) == "linear_ep0002_cached_crop192"
    assert folder(0, 288) == "linear_ep0002_cached_resize288"
    # A run seen whole at 8 px: a crop of 6 is resized to 6 px, and 6 px of an 8 px resize is another view (both
    # were named crop6: the second probe found the first's folder finished, and filed its record under its view).
    def whole(crop, resize=0, own_resize=0):
        return folder(crop, resize, own=EvalView(8, 8), own_resize=own_resize)
    assert whole(8) == whole(0, 8) == whole(8, 8) == "linear_ep0002_cached"
    assert whole(6) == whole(6, 6) == "linear_ep0002_cached_crop6"
    assert whole(6, 8) == "linear_ep0002_cached_crop6_resize8" and whole(0, 10) == "linear_ep0002_cached_resize10"
    # the same run trained with --eval_resize 8: a crop of 6 keeps the resize to 8, and a resize to 6 is another view
    assert whole(6, own_resize=8) == whole(6, 8, own_resize=8) == "linear_ep0002_cached_crop6"
    assert whole(6, 6, own_resize=8) == "linear_ep0002_cached_crop6_resize6"


def test_a_probe_of_weights_replaced_since_is_not_resumed_on_the_new_ones(tiny_run, tmp_path, run_in_process):
    """checkpoint.pth replaced by hand by other weights at the same epoch (another seed's run, a copy): the finished
    probe of the old weights was found 'finished' and scored its head on the new backbone (top-1 near chance)
    under the new weights' name. The probe keeps a digest of the weights it probed."""
    from conftest import TINY, assert_ok, assert_user_error, run_script

    run = copy_run(tiny_run, tmp_path / "run")
    probe = ["--run", run, "--cached_features", "true", "--epochs", 1, "--device", "cpu"]
    assert_ok(run_script("eval_linear.py", *probe))
    assert_ok(run_script("main_pretrain.py", *TINY, "--seed", 1, "--output_dir", tmp_path / "seed1"))
    shutil.copy(tmp_path / "seed1" / "checkpoint.pth", run / "checkpoint.pth")
    records = (run / "metrics.jsonl").read_text()
    result = run_in_process("eval_linear.py", *probe)
    assert_user_error(result, "eval_linear.py", "probed other weights (digest", "than the checkpoint holds now",
                      "it was replaced since", "to train the probe afresh")
    assert (run / "metrics.jsonl").read_text() == records


def test_a_probe_folder_that_is_a_file_is_named_as_such(tiny_run, tmp_path, run_in_process):
    """The refusal named --output_dir, which eval_linear.py does not take."""
    from conftest import assert_ok, assert_user_error, run_script

    run = copy_run(tiny_run, tmp_path / "run")
    probe = ["--run", run, "--cached_features", "true", "--epochs", 1, "--device", "cpu"]
    assert_ok(run_script("eval_linear.py", *probe))
    (folder,) = run.glob("linear_*")
    shutil.rmtree(folder)
    folder.write_text("in the way\n")
    assert_user_error(run_in_process("eval_linear.py", *probe), "eval_linear.py",
                      f"the probe folder {str(folder)!r} is a file, not a directory")


@pytest.mark.parametrize("flags, words", [
    (["--optimizer", "sgd", "--lars_trust", "0.01"], "--lars_trust 0.01 does nothing in this probe: it applies to "
                                                     "--optimizer lars"),
    (["--lars_exclude_bias_norm", "true"], "--lars_exclude_bias_norm true does nothing"),
    (["--lr_gamma", "0.5"], "--lr_gamma 0.5 does nothing in this probe: it applies to --schedule step"),
    (["--optimizer", "adam", "--momentum", "0.5"], "--momentum 0.5 does nothing in this probe"),
    (["--schedule", "constant", "--final_lr", "0.1"], "--final_lr 0.1 does nothing in this probe: it applies to "
                                                      "--schedule cosine"),
    (["--start_warmup", "0.1"], "--start_warmup 0.1 does nothing in this probe: it applies to a warm-up"),
    (["--sync_bn", "true"], "--sync_bn does nothing in a linear probe (its frozen backbone's batch norm runs in eval"),
    (["--find_unused", "true"], "--find_unused does nothing in a linear probe"),
])
def test_a_flag_that_does_nothing_in_the_probe_is_refused(flags, words):
    """Each trained a probe bit-identical to the one without it, under a folder and a record of its own: a table row
    per such flag with the same numbers."""
    from clusterlab import config
    from clusterlab.errors import ConfigError

    args = config.parse(eval_linear.get_args_parser(), ["--run", "x", *flags])
    with pytest.raises(ConfigError, match=re.escape(words)):
        eval_linear.check_flags(args)
    eval_linear.check_flags(config.parse(eval_linear.get_args_parser(), ["--run", "x"]))  # the defaults pass


def test_a_probe_resumed_on_another_number_of_processes_records_no_change(tiny_run, tmp_path, monkeypatch, capsys):
    """The probe's backbone is frozen with its batch norm in eval mode, and the probe has none of its own: a resume on
    another number of processes said that with --sync_bn false (the probe's default) the steps depended on it, and
    recorded the change in the probe's config.yaml."""
    from clusterlab import checkpoint, signals

    run = copy_run(tiny_run, tmp_path / "run")
    probe = ["--run", str(run), "--epochs", "2", "--batch_size", "64", "--device", "cpu"]
    with monkeypatch.context() as stopping:
        stopping.setattr(signals, "received", lambda: signal.SIGUSR2)  # at the end of the first step
        with pytest.raises(SystemExit) as stopped:
            eval_linear.main(probe)
    assert stopped.value.code == 75
    (probe_dir,) = run.glob("linear_*")
    state = checkpoint.load(probe_dir / "checkpoint.pth")
    tags = ("format", "schema", "kind", "method")
    checkpoint.save({**{k: v for k, v in state.items() if k not in tags}, "world_size": 2},
                    probe_dir / "checkpoint.pth", kind=state["kind"], method=state["method"])
    capsys.readouterr()
    eval_linear.main(probe)
    assert ("resumed on 1 process(es); the checkpoint was written by 2 (the global batch and its samples stay the "
            "same)") in capsys.readouterr().out
    assert yaml.safe_load((probe_dir / "config.yaml").read_text())["resume_changes"] == []


def test_a_probe_on_other_images_has_a_folder_of_its_own_and_a_held_probe_is_refused_before_extraction(
        tmp_path, run_in_process, monkeypatch):
    """An image-folder run probed on a second folder (`--data_path`, same --dataset): the probe took the folder of
    the run's own probe and was refused as "trained on another training set", with the advice to remove the
    finished probe. A copy of the run's own images is still its own probe. And a probe folder another process holds
    was refused only after every feature had been extracted (minutes at scale, for a duplicate job)."""
    import fabricate
    from conftest import PYTHON, TINY, assert_ok, assert_user_error, run_script, script_env

    from clusterlab.eval import features

    fabricate.make_imagefolder(tmp_path / "fm", n_per_class=6, classes=2, size=8)
    # (other images: other files, as another export's; the same file names and labels read as the same training set,
    # a resized or cleaned copy, as a resume reads them)
    fabricate.make_imagefolder(tmp_path / "fm2", n_per_class=7, classes=2, size=8, seed=1)
    shutil.copytree(tmp_path / "fm", tmp_path / "copy")
    run = tmp_path / "run"
    assert_ok(run_script("main_pretrain.py", *TINY, "--dataset", "imagefolder", "--data_path", tmp_path / "fm",
                         "--size_crops", 8, "--batch_size", 6, "--epochs", 1, "--output_dir", run))
    probe = ["eval_linear.py", "--run", run, "--epochs", 1, "--cached_features", "true", "--batch_size", 8, "--device",
             "cpu"]
    for data in ("fm", "fm2", "copy"):
        assert_ok(run_script(*probe, "--data_path", tmp_path / data))
    folders = sorted(path.name for path in run.glob("linear_ep*"))
    own = "linear_ep0001_cached_batch_size8_epochs1"
    assert len(folders) == 2 and own in folders, folders
    assert re.fullmatch(rf"{own}_fm2-[0-9a-f]{{8}}", [folder for folder in folders if folder != own][0]), folders
    data = [json.loads(line)["protocol"]["data"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["eval"] == "linear"]
    # other images carry their digest in the records too, as in the folder's name (under the folder's bare name, a
    # folder of the own folder's name would share its table row)
    other = [folder for folder in folders if folder != own][0].removeprefix(f"{own}_")
    assert data == ["fm", other, "copy"]

    holder = subprocess.Popen([PYTHON, "-c", "import sys, time; from clusterlab import rundir; "
                               "rundir.RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)",
                               str(run / "linear_ep0001_cached_batch_size8_epochs2")], stdout=subprocess.PIPE,
                              text=True, env=script_env())
    extracted = []
    monkeypatch.setattr(features.Evaluation, "features", lambda *args, **kwargs: extracted.append(1))
    try:
        assert holder.stdout.readline() == "held\n"
        result = run_in_process(*probe[:4], 2, *probe[5:])
    finally:
        holder.kill()
        holder.wait()
    assert_user_error(result, "eval_linear.py", "is in use by pid")
    assert extracted == []


def test_only_other_training_images_of_the_runs_own_dataset_and_split_name_a_probe_folder(tmp_path):
    """The tag is for a second folder of the run's own kind of images: an STL-10 run trained on train+unlabeled,
    probed on a copy of its files (node-local scratch), got one at every job and trained afresh; a transfer probe
    (`_cifar10`) got one when its path came by --data_path and none by DATASET_PATH: two folders for one probe."""
    from types import SimpleNamespace

    own, copy, other = (tmp_path / name for name in ("own", "copy", "other"))
    for folder in (own, copy, other):
        folder.mkdir()

    def tag(dataset, data_path, fingerprint, run_dataset="imagefolder", train_split="train"):
        loaded = SimpleNamespace(data_folder=str(own), args=argparse.Namespace(dataset=run_dataset,
                                                                               train_split=train_split),
                                 method=SimpleNamespace(info=SimpleNamespace(fingerprint="runs")))
        train_set = SimpleNamespace(name=dataset, split="train", fingerprint=fingerprint)
        return Evaluation(loaded, train_set, None, EvalView.of(8), 0, str(data_path)).other_images_tag()

    assert tag("imagefolder", other, "others123") == "other-others12"
    assert tag("imagefolder", copy, "runs") is None and tag("imagefolder", own, "others123") is None
    assert tag("stl10", copy, "trainsplit", run_dataset="stl10", train_split="train+unlabeled") is None
    assert tag("cifar10", other, "others123", run_dataset="stl10") is None
    assert tag("cifar100_20", other, "others123", run_dataset="cifar100") == "other-others12"
