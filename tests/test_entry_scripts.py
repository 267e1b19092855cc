"""The entry scripts end to end, tiny: main_pretrain -> eval_knn -> eval_cluster (K = 10 and an over-clustering
K = 20) -> eval_cluster --baseline pixels -> collect_results, checking the run directory and the metrics records
against the contract of docs/run-directory.md."""
from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from conftest import assert_ok, copy_run, run_script

RECORD_KEYS = {"run", "method", "dataset", "split", "backbone", "epoch", "checkpoint", "seed", "eval", "protocol",
               "metrics", "created", "git_commit", "git_dirty"}


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
    assert_ok(run_script("eval_cluster.py", "--run", run, "--clusters", 10, 20, "--restarts", 2, "--device", "cpu"))
    pixels = root / "pixels_digits"
    assert_ok(run_script("eval_cluster.py", "--baseline", "pixels", "--dataset", "digits", "--output_dir", pixels,
                         "--restarts", 2, "--plot", "false"))

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
    assert (run / "kmeans_k10_checkpoint_test_confusion.png").stat().st_size > 0
    assert (run / "kmeans_k20_checkpoint_test_confusion.png").exists()
    assert (run / "kmeans_k20_checkpoint_test_samples.png").stat().st_size > 0

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
    assert [p.name for p in (out / "curves").iterdir()] == ["swav_digits_s0.png"]  # pixels has no training log


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
