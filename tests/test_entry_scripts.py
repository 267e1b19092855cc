"""The entry scripts end to end, tiny: main_pretrain -> eval_knn -> eval_cluster (K = 10 and an over-clustering
K = 20) -> eval_cluster --baseline pixels -> collect_results, checking the run directory and the metrics records
against the contract of docs/run-directory.md."""
from __future__ import annotations

import json
import os
import re
import subprocess

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans

import fabricate
from clusterlab import results
from clusterlab.errors import ConfigError
from clusterlab.data import registry
from clusterlab.data.augment import eval_view
from clusterlab.eval.features import load_run
from clusterlab.eval.knn import knn_accuracy
from clusterlab.eval.metrics import cluster_metrics
from conftest import ONE_EPOCH, PYTHON, ROOT, TINY, assert_ok, copy_run, entry_module, run_script, script_env

RECORD_KEYS = {"run", "method", "dataset", "split", "backbone", "epoch", "step", "checkpoint", "seed", "eval",
               "protocol", "metrics", "created", "git_commit", "git_dirty"}


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_record_shape(rec: dict) -> None:
    assert set(rec) == RECORD_KEYS, set(rec) ^ RECORD_KEYS
    assert rec["dataset"] == "digits" and rec["split"] == "test"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", rec["created"])
    assert rec["protocol"]["fit_on"] == "train" and rec["protocol"]["selection"] == "last"
    assert all(0.0 <= v <= 1.0 or k in ("ami", "ari") for k, v in rec["metrics"].items())
    assert re.fullmatch(r"[0-9a-f]{40}", rec["git_commit"]) and isinstance(rec["git_dirty"], bool)  # a checkout


def test_pretrain_evaluate_and_collect(tiny_run, tmp_path):
    root = tmp_path / "runs"
    run = copy_run(tiny_run, root / "swav_digits_s0")
    assert {p.name for p in run.iterdir()} == {"config.yaml", "checkpoint.pth", "checkpoint_ep0001.pth",
                                               "checkpoint_ep0002.pth", "train_log.jsonl", "status.json"}
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    epochs_logged = [r for r in log if r.get("epoch_end")]
    assert [r["epoch"] for r in epochs_logged] == [0, 1] and all("swav_mean" in r for r in epochs_logged)

    assert_ok(run_script("eval_knn.py", "--run", run, "--k", 20, "--device", "cpu"))
    assert_ok(run_script("eval_knn.py", "--run", run, "--checkpoint", "checkpoint_ep0001.pth", "--k", 20,
                         "--device", "cpu"))
    clustered = run_script("eval_cluster.py", "--run", run, "--clusters", 10, 20, "--restarts", 2, "--device", "cpu")
    assert_ok(clustered)
    pixels = root / "pixels_digits"
    baseline = run_script("eval_cluster.py", "--baseline", "pixels", "--dataset", "digits", "--output_dir", pixels,
                          "--restarts", 2, "--plot", "false")
    assert_ok(baseline)
    # Each result line names the view it scored: the run's training crop, the pixels' own 8 px
    assert "k-means K=10 (backbone, fit on train, 8 px) on digits test classes: ACC" in clustered.stdout
    assert "k-means K=10 (pixels, fit on train, 8 px) on digits test classes: ACC" in baseline.stdout

    knn, knn_first, k10, k20 = records(run)
    for rec in (knn, knn_first, k10, k20):
        assert_record_shape(rec)
        assert (rec["run"], rec["method"], rec["backbone"], rec["seed"]) == ("swav_digits_s0", "swav",
                                                                             "resnet18_cifar_w4", 0)
    assert (knn["eval"], knn["epoch"], knn["checkpoint"]) == ("knn", 2, "checkpoint.pth")
    assert (knn_first["epoch"], knn_first["checkpoint"]) == (1, "checkpoint_ep0001.pth")
    assert knn["protocol"]["k"] == 20 and knn["protocol"]["temperature"] == 0.1
    assert knn["protocol"]["train_features"] == "recomputed" and knn["protocol"]["features"] == "backbone"
    assert set(knn["metrics"]) == {"top1", "top5"} and knn["metrics"]["top5"] >= knn["metrics"]["top1"] > 0.1
    assert knn["metrics"] != knn_first["metrics"]
    assert (k10["eval"], k10["protocol"]["clusters"], k10["protocol"]["mapping"]) == ("cluster", 10, "hungarian")
    assert (k20["protocol"]["clusters"], k20["protocol"]["mapping"]) == (20, "majority")  # over-clustering
    assert k10["protocol"]["superclass"] is False and k10["protocol"]["features"] == "backbone"
    assert set(k10["metrics"]) == {"acc", "nmi", "ami", "ari"}
    assert (run / "kmeans_k10_restarts2_checkpoint_test_confusion.png").stat().st_size > 0
    assert (run / "kmeans_k20_restarts2_checkpoint_test_confusion.png").exists()
    assert (run / "kmeans_k20_restarts2_checkpoint_test_samples.png").stat().st_size > 0

    [baseline] = records(pixels)
    assert_record_shape(baseline)
    assert (baseline["method"], baseline["eval"], baseline["backbone"], baseline["epoch"]) == ("pixels", "cluster",
                                                                                                "none", None)
    assert baseline["protocol"]["features"] == "pixels" and baseline["protocol"]["normalize"] is False
    assert baseline["metrics"]["acc"] > 0.6  # k-means on digits' raw pixels is far above chance (0.1)
    assert not list(pixels.glob("*.png"))  # --plot false

    out = tmp_path / "tables"
    result = run_script("collect_results.py", "--root", root, "--out", out, "--published", "")
    assert_ok(result)
    assert "## digits" in result.stdout and result.stderr == ""
    table = pd.read_csv(out / "digits.csv")
    assert len(table) == 5 and set(table["method"]) == {"swav", "pixels"}
    assert sorted(table[table["eval"] == "knn"]["epoch"].astype(str)) == ["1", "2"]
    row = table[table["protocol"].str.contains("clusters=20")].iloc[0]
    assert row["n"] == 1 and row["acc_mean"] == pytest.approx(100 * k20["metrics"]["acc"], abs=1e-9)
    assert {"digits.md", "digits.tex", "digits_acc.png", "digits_top1.png"} <= {p.name for p in out.iterdir()}
    # Trained and evaluated by this checkout: the revision is clean or dirty as the records say, never unknown.
    assert set(table["revision"]) == {"dirty" if knn["git_dirty"] else "clean"}
    assert [p.name for p in (out / "curves").glob("*.png")] == ["swav_digits_s0.png"]  # pixels has no training log


def test_skip_recorded_skips_only_an_evaluation_of_the_runs_own_data(tiny_run, tmp_path):
    """--skip_recorded finds the record of the run's own data and skips; named data (--dataset / --data_path) may be
    other data than that record's, so the evaluation runs and records again."""
    run = copy_run(tiny_run, tmp_path / "run")

    def knn_records() -> int:
        return sum(json.loads(line)["eval"] == "knn" for line in (run / "metrics.jsonl").read_text().splitlines())

    knn = ["eval_knn.py", "--run", run, "--k", "5", "--device", "cpu", "--skip_recorded", "true"]
    assert_ok(run_script(*knn))
    assert knn_records() == 1
    skipped = run_script(*knn)
    assert_ok(skipped)
    assert "already recorded" in skipped.stdout and knn_records() == 1
    assert_ok(run_script(*knn, "--dataset", "digits"))
    assert knn_records() == 2
    # Several k score the same features: k=5 is skipped as recorded, k=7 is computed.
    several = run_script(*knn[:-4], "7", "5", "--device", "cpu", "--skip_recorded", "true")
    assert_ok(several)
    assert "k=5 and this protocol already recorded" in several.stdout and "k=7," in several.stdout
    assert knn_records() == 3
    assert_ok(run_script(*knn[:-4], "7", "--device", "cpu"))  # both again, in one call
    top1_by_k = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["eval"] == "knn" and record["dataset"] == "digits":
            top1_by_k.setdefault(record["protocol"]["k"], set()).add(record["metrics"]["top1"])
    assert {k: len(values) for k, values in top1_by_k.items()} == {5: 1, 7: 1}  # one value per k, however asked
    cluster = ["eval_cluster.py", "--run", run, "--device", "cpu", "--skip_recorded", "true", "--restarts", "1"]
    assert_ok(run_script(*cluster))
    assert "already recorded" in run_script(*cluster).stdout
    assert "already recorded" not in run_script(*cluster, "--dataset", "digits").stdout


def evaluate(program: str, *argv) -> None:
    """An evaluation program's main in this process (its records name the git commit, as from the command line)."""
    entry_module(program).main([str(a) for a in argv])


def test_skip_recorded_k_means_of_another_split_is_evaluated(tiny_run, tmp_path, capsys):
    run = copy_run(tiny_run, tmp_path / "run")
    cluster = ["eval_cluster", "--run", run, "--device", "cpu", "--skip_recorded", "true", "--restarts", 1,
               "--plot", "false"]
    evaluate(*cluster)
    evaluate(*cluster, "--split", "train")  # only the test split is recorded: scored
    assert [r["split"] for r in records(run)] == ["test", "train"]
    capsys.readouterr()
    evaluate(*cluster, "--split", "train")
    assert "already recorded" in capsys.readouterr().out and len(records(run)) == 2


def test_a_stop_while_k_means_figures_are_drawn_leaves_no_record_without_them(tiny_run, tmp_path, monkeypatch):
    """A stop signal (the exit for the requeue) while eval_cluster drew its figures came after the record: the
    requeued job's --skip_recorded took the evaluation as done, and its figures were never drawn."""
    from clusterlab.programs import eval_cluster

    run = copy_run(tiny_run, tmp_path / "run")
    cluster = ["eval_cluster", "--run", run, "--device", "cpu", "--skip_recorded", "true", "--restarts", 1]

    def stopped(*args):
        raise SystemExit(75)
    with monkeypatch.context() as patched:
        patched.setattr(eval_cluster, "cluster_samples_png", stopped)
        with pytest.raises(SystemExit):
            evaluate(*cluster)
    assert not (run / "metrics.jsonl").exists()
    evaluate(*cluster)
    assert len(records(run)) == 1 and len(list(run.glob("kmeans_k10_*_samples.png"))) == 1
    # A figure that fails to draw (not a stop) leaves the record, then its error ends the program.
    def broken(*args):
        raise RuntimeError("no figure")
    with monkeypatch.context() as patched:
        patched.setattr(eval_cluster, "cluster_samples_png", broken)
        with pytest.raises(RuntimeError, match="no figure"):
            evaluate(*cluster, "--clusters", 5)
    assert [r["protocol"]["clusters"] for r in records(run)] == [10, 5]


def test_skip_recorded_k_means_without_its_superclass_record_is_evaluated_again(tmp_path, capsys):
    """A stop between the two records of CIFAR-100's k-means (classes, then superclasses) left the superclass record
    unwritten for good: --skip_recorded took the class record alone for the evaluation."""
    root = fabricate.make_cifar100(tmp_path / "c100", n_train=64, n_test=40, seed=2)
    run = tmp_path / "run"
    entry_module("main_pretrain").main([str(a) for a in (*TINY, "--epochs", 1, "--dataset", "cifar100",
                                                         "--data_path", root, "--output_dir", run)])
    cluster = ["eval_cluster", "--run", run, "--device", "cpu", "--skip_recorded", "true", "--restarts", 1,
               "--clusters", 5, "--plot", "false"]
    capsys.readouterr()
    evaluate(*cluster)
    assert [r["protocol"]["superclass"] for r in records(run)] == [False, True]
    # which of the two superclass protocols this is (a researcher comparing with SCAN's numbers needs the other)
    assert ("superclasses through the 100 classes (CIFAR-100-20 as the clustering papers score it: --dataset "
            "cifar100_20): ACC") in capsys.readouterr().out
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text(lines[0])  # stopped between the two appends
    capsys.readouterr()
    evaluate(*cluster)
    assert "already recorded" not in capsys.readouterr().out
    assert [r["protocol"]["superclass"] for r in records(run)] == [False, False, True]
    evaluate(*cluster)
    assert "already recorded" in capsys.readouterr().out and len(records(run)) == 3
    # CIFAR-100-20 is the run's images under coarse labels: scored from the run's own files without --data_path
    # (it looked in ./data)
    capsys.readouterr()
    evaluate(*cluster, "--dataset", "cifar100_20")
    assert records(run)[-1]["dataset"] == "cifar100_20"
    assert "note:" not in capsys.readouterr().out  # (not "changed since it trained": the same files, other labels)


def test_skip_recorded_reads_past_a_line_that_is_not_a_record(tiny_run, tmp_path, capsys):
    """A line of metrics.jsonl whose protocol is not a mapping (the tables skip it) stopped --skip_recorded with a
    traceback."""
    run = copy_run(tiny_run, tmp_path / "run")
    knn = ["eval_knn", "--run", run, "--k", 5, "--device", "cpu", "--skip_recorded", "true"]
    (run / "metrics.jsonl").write_text(json.dumps({"eval": "knn", "checkpoint": "checkpoint.pth", "dataset": "digits",
                                                   "epoch": 2, "step": 0, "protocol": [1, 2]}) + "\n")
    evaluate(*knn)
    assert len(records(run)) == 2 and records(run)[1]["protocol"]["k"] == 5
    capsys.readouterr()
    evaluate(*knn)
    assert "already recorded" in capsys.readouterr().out and len(records(run)) == 2


def test_k_means_fit_size_is_recorded_where_it_leaves_images_out(tiny_run, tmp_path, capsys):
    run = copy_run(tiny_run, tmp_path / "run")
    cluster = ["eval_cluster", "--run", run, "--device", "cpu", "--restarts", 1, "--plot", "false"]
    evaluate(*cluster, "--fit_size", 200)
    evaluate(*cluster, "--fit_size", 898)  # the whole train split
    part, whole = records(run)
    assert part["protocol"]["fit_size"] == 200 and "fit_size" not in whole["protocol"]
    with pytest.raises(ConfigError, match=r"--clusters 30 is more than the 20 images of the train split k-means is "
                                          r"fitted on \(use at most 20\)"):
        evaluate(*cluster, "--fit_size", 20, "--clusters", 30)
    with pytest.raises(ConfigError, match=r"--clusters 10 \(the default: the number of classes\) is more than the 5 "):
        evaluate(*cluster, "--fit_size", 5)


def test_skip_recorded_k_means_all_recorded_pass_over_no_image(tiny_run, tmp_path, monkeypatch, capsys):
    """A requeued evaluation job whose k-means were all recorded computed the features of both splits first."""
    from clusterlab.eval import features

    run = copy_run(tiny_run, tmp_path / "run")
    cluster = ["eval_cluster", "--run", run, "--device", "cpu", "--skip_recorded", "true", "--restarts", 1,
               "--plot", "false", "--clusters", 10, 20]
    evaluate(*cluster[:-1])
    passes = []
    extract = features.extract
    monkeypatch.setattr(features, "extract", lambda *args, **kwargs: passes.append(1) or extract(*args, **kwargs))
    capsys.readouterr()
    evaluate(*cluster[:-1])
    assert passes == [] and "k-means K=10 already recorded" in capsys.readouterr().out
    evaluate(*cluster)  # K=20 is new: both splits' features, and only K=20 k-means
    assert passes == [1, 1] and [r["protocol"]["clusters"] for r in records(run)] == [10, 20]


def test_a_k_above_the_train_set_is_recorded_with_the_k_used(tiny_run, tmp_path, capsys):
    """A recipe's k = 200 on a small set: every train image votes, and the record says how many did."""
    run = copy_run(tiny_run, tmp_path / "run")
    evaluate("eval_knn", "--run", run, "--k", 898, 5000, "--device", "cpu")
    assert "--k 5000 is more than the 898 train images" in capsys.readouterr().out
    whole, above = records(run)
    assert "k_used" not in whole["protocol"] and (above["protocol"]["k"], above["protocol"]["k_used"]) == (5000, 898)
    assert above["metrics"] == whole["metrics"]


def test_a_checkpoint_of_another_directory_evaluated_again_is_skipped(tiny_run, tmp_path, capsys):
    """--skip_recorded knows another directory's file by the full path its records name, before loading the run;
    a record of the run's own file of that name does not stand for it."""
    run = copy_run(tiny_run, tmp_path / "run")
    knn = ["eval_knn", "--run", run, "--k", 20, "--device", "cpu", "--skip_recorded", "true"]
    evaluate(*knn)
    evaluate(*knn, "--checkpoint", tiny_run / "checkpoint.pth")
    evaluate(*knn, "--checkpoint", tiny_run / "checkpoint.pth")
    output = capsys.readouterr().out
    assert output.count("already recorded") == 1
    assert [r["checkpoint"] for r in records(run)] == ["checkpoint.pth", str((tiny_run / "checkpoint.pth").resolve())]


def test_k_means_of_another_seed_is_its_own_evaluation_with_its_own_figures(tiny_run, tmp_path, capsys):
    """The k-means seed is in the protocol where it is not the default (records made before name none), and the
    figures of other settings (seed, features, a split fitted on, restarts, the test view) keep their own names;
    --clusters 10 10 is one evaluation."""
    run = copy_run(tiny_run, tmp_path / "run")
    cluster = ["eval_cluster", "--run", run, "--device", "cpu", "--skip_recorded", "true", "--restarts", 1]
    evaluate(*cluster, "--clusters", 10, 10)
    figure = run / "kmeans_k10_restarts1_checkpoint_test_confusion.png"
    default_figure = figure.read_bytes()
    evaluate(*cluster, "--seed", 5)
    evaluate(*cluster, "--features", "embedding", "--fit_on", "test")
    assert "already recorded" not in capsys.readouterr().out
    assert [r["protocol"].get("seed") for r in records(run)] == [None, 5, None]
    assert figure.read_bytes() == default_figure
    assert (run / "kmeans_k10_seed5_restarts1_checkpoint_test_confusion.png").is_file()
    assert (run / "kmeans_k10_embedding_fit-test_restarts1_checkpoint_test_confusion.png").is_file()
    evaluate(*cluster, "--seed", 5)
    assert "already recorded" in capsys.readouterr().out and len(records(run)) == 3
    evaluate(*cluster, "--checkpoint", tiny_run / "checkpoint.pth")  # another directory's file
    assert figure.read_bytes() == default_figure
    assert len(list(run.glob("kmeans_k10_restarts1_from*_checkpoint_test_confusion.png"))) == 1
    # another number of restarts and another test view: figures of their own (one replaced the other)
    evaluate(*cluster, "--restarts", 2)
    evaluate(*cluster, "--eval_crop", 6)
    assert figure.read_bytes() == default_figure
    assert (run / "kmeans_k10_restarts2_checkpoint_test_confusion.png").is_file()
    assert (run / "kmeans_k10_restarts1_crop6_checkpoint_test_confusion.png").is_file()
    # the run's own test view (8 px) asked for by name is the default evaluation: its figure, not a second name
    figure.unlink()
    evaluate(*cluster, "--skip_recorded", "false", "--eval_crop", 8)
    assert figure.read_bytes() == default_figure
    assert not list(run.glob("*crop8*"))


def reference_kmeans(fit_x: torch.Tensor, scored_x: torch.Tensor, labels: torch.Tensor, restarts: int) -> dict:
    """scikit-learn's k-means (10 clusters, seed 0) fitted on `fit_x`, scored on `scored_x`."""
    model = KMeans(n_clusters=10, n_init=restarts, init="k-means++", random_state=0).fit(fit_x.double().numpy())
    return cluster_metrics(labels.numpy(), model.predict(scored_x.double().numpy()), 10, 10)


def test_k_means_normalize_flag_is_honoured_for_runs_and_pixels(tiny_run, tmp_path):
    """--normalize auto: a run's features L2-normalised, pixels raw (as records said before the flag was honoured);
    true / false do that to either, and the record says which."""
    run = copy_run(tiny_run, tmp_path / "run")
    common = ["--device", "cpu", "--restarts", 2, "--plot", "false", "--batch_size", 1000]
    for value in ("auto", "false", "true"):
        evaluate("eval_cluster", "--run", run, *common, "--normalize", value)
        evaluate("eval_cluster", "--baseline", "pixels", "--dataset", "digits", "--output_dir", tmp_path / "pixels",
                 *common, "--normalize", value)
    # The references: the run's backbone features of the whole images (one batch, as --batch_size 1000 computes
    # them) and pixels / 255, raw and L2-normalised by hand.
    loaded = load_run(run, None, torch.device("cpu"))
    info = loaded.method.info
    train, test = (registry.load("digits", split) for split in ("train", "test"))
    with torch.no_grad():
        features = [loaded.method.features(eval_view(s.images, 8, info.mean, info.std)) for s in (train, test)]
    pixels = [s.images.reshape(len(s), -1).float() / 255 for s in (train, test)]
    for found, (fit_x, scored_x), auto in ((records(run), features, True),
                                           (records(tmp_path / "pixels"), pixels, False)):
        raw = reference_kmeans(fit_x, scored_x, test.labels, 2)
        normalised = reference_kmeans(F.normalize(fit_x, dim=1), F.normalize(scored_x, dim=1), test.labels, 2)
        assert raw != normalised  # the flag makes a difference the records can show
        assert [r["protocol"]["normalize"] for r in found] == [auto, False, True]
        assert [r["metrics"] for r in found] == [normalised if auto else raw, raw, normalised]


def test_evaluations_at_another_crop_of_an_in_memory_set_are_recorded_as_such(tiny_run, tmp_path, capsys):
    """The tiny run's test view is its 8-pixel training crop: records at that size name no view (as they always
    did), records at another --eval_crop name it, so neither --skip_recorded nor the tables take one for the other."""
    run = copy_run(tiny_run, tmp_path / "run")
    knn = ["eval_knn", "--run", run, "--k", 5, "--device", "cpu", "--skip_recorded", "true"]
    cluster = ["eval_cluster", "--run", run, "--device", "cpu", "--restarts", 1, "--plot", "false",
               "--skip_recorded", "true"]
    for argv in (knn, cluster):
        evaluate(*argv)
        evaluate(*argv, "--eval_crop", 6)  # not taken for the 8-pixel record: scored
    capsys.readouterr()
    for argv in (knn, cluster):
        evaluate(*argv, "--eval_crop", 6)
    assert capsys.readouterr().out.count("already recorded") == 2
    evaluate(*knn[:-2], "--eval_crop", 8)  # the default crop, named: recorded as the default
    knn_8, knn_6, cluster_8, cluster_6, knn_8_named = records(run)
    assert [r["protocol"].get("eval_crop") for r in records(run)] == [None, 6, None, 6, None]
    assert knn_8["protocol"] == knn_8_named["protocol"] and knn_8["metrics"] == knn_8_named["metrics"]
    assert knn_6["metrics"] != knn_8["metrics"] and cluster_6["metrics"] != cluster_8["metrics"]
    table = results.aggregate(results.records_frame(results.read_records(run)))
    assert len(table) == 4 and (table["n"] == 1).all()


def test_skip_recorded_takes_a_record_only_for_the_view_asked_for(tiny_run, tmp_path, capsys):
    """A record at another --eval_crop does not stand for the run's own view: asked for that view afterwards, kNN
    evaluates. The own view's record is then taken whether the view is asked for by name (--eval_crop 8) or left
    to the run, also where the run's --size_crops 0 leaves it to the images' size (read from the checkpoint)."""
    run = copy_run(tiny_run, tmp_path / "run")
    knn = ["eval_knn", "--run", run, "--k", 5, "--device", "cpu", "--skip_recorded", "true"]
    evaluate(*knn, "--eval_crop", 6)
    evaluate(*knn)
    assert [r["protocol"].get("eval_crop") for r in records(run)] == [6, None]
    capsys.readouterr()
    evaluate(*knn, "--eval_crop", 8)
    evaluate(*knn)
    config = run / "config.yaml"
    config.write_text(re.sub(r"size_crops:\n- 8", "size_crops:\n- 0", config.read_text()))
    assert "- 0" in config.read_text()
    evaluate(*knn)
    assert capsys.readouterr().out.count("already recorded") == 3 and len(records(run)) == 2


def test_skip_recorded_does_not_take_the_runs_record_for_another_runs_checkpoint(tiny_run, tmp_path, capsys,
                                                                                   monkeypatch):
    """Records name the run's own checkpoint by its file name and any other by its full path:
    `--checkpoint OTHER_RUN/checkpoint.pth` is evaluated although RUN holds a record of its own checkpoint.pth, and
    its record cannot stand for the run's own; the run's own file, named by its path, is skipped, and so is a bare
    name, which means the run's file even where the current directory holds one of that name."""
    run = copy_run(tiny_run, tmp_path / "run")
    knn = ["eval_knn", "--run", run, "--k", 5, "--device", "cpu", "--skip_recorded", "true"]
    evaluate(*knn)
    capsys.readouterr()
    evaluate(*knn, "--checkpoint", tiny_run / "checkpoint.pth")
    evaluate(*knn, "--checkpoint", run / "checkpoint.pth")
    monkeypatch.chdir(tiny_run)
    evaluate(*knn, "--checkpoint", "checkpoint.pth")
    assert capsys.readouterr().out.count("already recorded") == 2
    assert [r["checkpoint"] for r in records(run)] == ["checkpoint.pth", str((tiny_run / "checkpoint.pth").resolve())]


def test_requested_record_names_an_image_folders_view_as_its_records_do(tmp_path, monkeypatch):
    """Records of an image folder name the resize and crop they were scored at, records of an in-memory set only a
    crop other than the run's: a request matches a record in either form only at the same view, only a record of
    the run's own dataset, and only one of the checkpoint's epoch and step (checkpoint.pth moves on as a run trains).
    The run's flags come from its config and checkpoint (here a stand-in for the latter, which the test reads
    memory-mapped)."""
    from argparse import Namespace

    from clusterlab.eval import features

    saved = {"args": {"dataset": "imagefolder", "data_path": str(tmp_path / "imgs"), "size_crops": [12, 8],
                      "eval_crop": 0, "eval_resize": 14},
             "data_info": {"image_size": 16}, "epoch": 3, "step": 0}
    monkeypatch.setattr(features.checkpoint, "load", lambda path, **kwargs: saved)
    (tmp_path / "config.yaml").write_text("args:\n  dataset: imagefolder\n")
    fabricate.make_mixed_imagefolder(tmp_path / "imgs", n_per_class=2, classes=2)
    sizes = dict(zip(("train_images", "scored_images"), registry.imagefolder_sizes(tmp_path / "imgs")))
    base = {"k": 5}
    folder_default = {**base, "data": "imgs", **sizes, "eval_crop": 12, "eval_resize": 14}
    folder_other = {**base, "data": "imgs", **sizes, "eval_crop": 10, "eval_resize": 14}

    def skipped(record_protocol, dataset="imagefolder", position=None, **flags):
        run = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        run.mkdir()
        (run / "config.yaml").write_text((tmp_path / "config.yaml").read_text())
        record = {"eval": "knn", "checkpoint": "checkpoint.pth", "dataset": dataset, "epoch": 3, "step": 0,
                  "protocol": record_protocol, "metrics": {}}
        if position == "unnamed step":  # a record written before records named their step
            del record["step"]
        elif position is not None:
            record["epoch"], record["step"] = position
        (run / "metrics.jsonl").write_text(json.dumps(record) + "\n")
        args = Namespace(**{"skip_recorded": True, "run": str(run), "checkpoint": None, "dataset": None,
                            "data_path": None, "eval_crop": 0, "eval_resize": 0, **flags})
        return results.skip_recorded(args, run, "knn", "checkpoint.pth", base, features.requested_record(args))

    assert skipped(folder_default) and skipped(folder_default, eval_crop=12)
    assert not skipped(folder_default, dataset="digits")
    assert not skipped({**folder_default, "data": "other"})  # another folder, named by --data_path
    assert not skipped({**folder_default, "scored_images": sizes["scored_images"] + 1})  # an image removed since
    assert not skipped(folder_default, eval_crop=10) and skipped(folder_other, eval_crop=10)
    assert not skipped(folder_other) and not skipped(folder_default, eval_resize=16)
    assert skipped(base) and skipped({**base, "eval_crop": 10}, eval_crop=10)  # in-memory records
    assert not skipped({**base, "eval_crop": 10}) and not skipped(base, eval_crop=10)
    saved["args"].update(size_crops=[0], eval_resize=0)  # the test view is then the images' (nominal) size, whole
    assert skipped({**base, "data": "imgs", **sizes, "eval_crop": 16, "eval_resize": 16})
    assert not skipped(folder_default)
    assert skipped(base, position="unnamed step") and not skipped(base, position=(2, 0))
    saved["step"] = 5  # a checkpoint a stop signal saved mid-epoch: not the end of epoch 3 recorded before
    assert not skipped(base, position="unnamed step") and not skipped(base) and skipped(base, position=(3, 5))
    monkeypatch.undo()
    assert features.requested_record(Namespace(skip_recorded=True, run=str(tmp_path / "missing"), checkpoint=None,
                                               eval_crop=0, eval_resize=0)).views == []


def test_skip_recorded_k_means_at_another_crop_or_of_other_data_is_evaluated(tiny_run, tmp_path, capsys):
    """eval_cluster.py skips once its run is open, by the exact record: a k-means record at another --eval_crop, or
    of another dataset (--dataset names it), does not stand for the run's own view of its own data."""
    run = copy_run(tiny_run, tmp_path / "run")
    cluster = ["eval_cluster", "--run", run, "--device", "cpu", "--restarts", 1, "--plot", "false",
               "--skip_recorded", "true"]
    evaluate(*cluster, "--eval_crop", 6)
    evaluate(*cluster)
    assert [r["protocol"].get("eval_crop") for r in records(run)] == [6, None]
    capsys.readouterr()
    evaluate(*cluster)
    assert capsys.readouterr().out.count("already recorded") == 1 and len(records(run)) == 2
    other = copy_run(tiny_run, tmp_path / "other")
    capsys.readouterr()
    evaluate(*[str(other) if a == run else a for a in cluster], "--dataset", "fashion_mnist", "--fit_on", "test")
    # scored on another dataset than it trained on: said (main_cluster.py's --pretrained says it; this did not)
    assert (f"note: run {str(other)!r} was trained on digits and is scored on fashion_mnist: its images take the "
            f"8 px test view and the run's mean [") in capsys.readouterr().out
    evaluate(*[str(other) if a == run else a for a in cluster], "--fit_on", "test")
    assert "is scored on" not in capsys.readouterr().out
    assert [r["dataset"] for r in records(other)] == ["fashion_mnist", "digits"]


def test_pixel_baseline_of_an_in_memory_set_takes_the_eval_crop(tmp_path):
    """`--eval_crop 4` scores digits' 8x8 images resized whole to 4x4, as a run's test view would show them, and
    the record says so; the default scores them as they are and names no view."""
    for crop in (None, 4):
        evaluate("eval_knn", "--baseline", "pixels", "--dataset", "digits", "--output_dir", tmp_path, "--k", 5,
                 *(["--eval_crop", crop] if crop else []))
    whole, small = records(tmp_path)
    assert "eval_crop" not in whole["protocol"] and small["protocol"]["eval_crop"] == 4
    train, test = (registry.load("digits", split) for split in ("train", "test"))
    for record, size in ((whole, 8), (small, 4)):
        # the images resized by hand (torch's antialiased bilinear, a run's test view of an in-memory set)
        x = [F.normalize(F.interpolate(s.images.float() / 255, size=(size, size), mode="bilinear",
                                       align_corners=False, antialias=True).reshape(len(s), -1), dim=1)
             for s in (train, test)]
        assert record["metrics"] == knn_accuracy(x[0], train.labels, x[1], test.labels, 10, k=5, temperature=0.1)
    assert whole["metrics"] != small["metrics"]


def test_pixel_k_means_is_fitted_on_the_split_fit_on_names(tmp_path, capsys):
    """--baseline pixels --fit_on test fits k-means on the test images, as the record says (it used to fit on train
    whatever the flag)."""
    from clusterlab.data import load
    from clusterlab.data.augment import EvalView
    from clusterlab.eval.features import pixels
    from clusterlab.eval.kmeans import kmeans_assign
    from clusterlab.eval.metrics import cluster_metrics

    entry_module("eval_cluster").main(["--baseline", "pixels", "--dataset", "digits", "--output_dir", str(tmp_path),
                                       "--fit_on", "test", "--restarts", "1", "--plot", "false"])
    capsys.readouterr()
    [record] = records(tmp_path)
    test = load("digits", "test")
    test_x = pixels(test, EvalView.of(test.image_size, 0))
    expected = cluster_metrics(test.labels.numpy(), kmeans_assign(test_x, test_x, 10, 1, 0), 10, 10)
    assert record["protocol"]["fit_on"] == "test" and record["metrics"] == pytest.approx(expected, abs=0)


def test_skip_recorded_heads_all_recorded_pass_over_no_image(tmp_path, monkeypatch, capsys):
    """A requeued evaluation job of a class-assignment run whose heads are all recorded ran every head over the whole
    test split before it found them recorded."""
    from clusterlab.programs import eval_cluster

    run = tmp_path / "selfclassifier"
    assert_ok(run_script("main_cluster.py", "--method", "selfclassifier", "--dataset", "digits", "--width", "4",
                         "--batch_size", "32", "--size_crops", "8", "--epochs", "1", "--head_classes", "10", "20",
                         "--hidden_dim", "32", "--embed_dim", "16", "--device", "cpu", "--output_dir", run))
    evaluate = entry_module("eval_cluster").main
    evaluate(["--run", str(run), "--device", "cpu", "--plot", "false"])
    passes = []
    extract = eval_cluster.extract
    monkeypatch.setattr(eval_cluster, "extract", lambda *args, **kwargs: passes.append(1) or extract(*args, **kwargs))
    capsys.readouterr()
    evaluate(["--run", str(run), "--device", "cpu", "--plot", "false", "--skip_recorded", "true"])
    assert passes == [] and capsys.readouterr().out.count("already recorded") == 2
    evaluate(["--run", str(run), "--device", "cpu", "--plot", "false", "--skip_recorded", "true", "--split", "train"])
    assert passes == [1]  # another split: evaluated


def test_a_run_whose_output_pipe_closes_goes_on_to_the_end(tmp_path):
    """`main_pretrain.py ... | head -2`: the next progress line met the closed pipe, and the run failed with a
    BrokenPipeError traceback after its first lines; its log and status keep what the lines said."""
    run = tmp_path / "run"
    process = subprocess.Popen([PYTHON, str(ROOT / "main_pretrain.py"), *ONE_EPOCH, "--output_dir", str(run)],
                               cwd=ROOT, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = process.stdout.readline()
    process.stdout.close()  # the reader goes away
    _, errors = process.communicate(timeout=180)
    assert first.startswith("note: ") and process.returncode == 0, errors
    assert "Traceback" not in errors
    assert json.loads((run / "status.json").read_text())["state"] == "finished"


def test_a_program_started_with_its_output_closed_runs(tmp_path):
    """`>&-`: Python's sys.stdout is None there, which print() skips; the wrapper for a closing pipe must not
    replace it with an object that fails."""
    run = tmp_path / "run"
    done = subprocess.run([PYTHON, str(ROOT / "main_pretrain.py"), *ONE_EPOCH, "--output_dir", str(run)], cwd=ROOT,
                          env=script_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          timeout=180, pass_fds=(), preexec_fn=lambda: os.close(1))
    assert done.returncode == 0, done.stderr
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
