"""Metrics records and result tables (results.py, collect_results.py): corrupt lines skipped with a warning naming
file:line, mean/std/n over seeds exactly, published numbers matched on method/dataset/backbone/eval/epochs with
their diff, and collect_results.py end to end on fabricated metrics.jsonl files."""
from __future__ import annotations

import io
import json
import math
import re
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pandas as pd
import pytest
import yaml

from clusterlab import config, results
from clusterlab.methods.cluster_base import pretrained_origin
from clusterlab.programs.collect_results import COMBINED_MARK
from conftest import ROOT, assert_ok, entry_module, run_script, snapshot


def record(seed=0, method="swav", dataset="digits", epoch=200, eval_kind="cluster", protocol=None, run=None,
           **metrics):
    return {"run": run or f"{method}_{dataset}_s{seed}", "method": method, "dataset": dataset, "split": "test",
            "backbone": "resnet18_cifar_w16" if method != "pixels" else "none", "epoch": epoch,
            "checkpoint": "checkpoint.pth", "seed": seed, "eval": eval_kind,
            "protocol": protocol or {"clusters": 10, "fit_on": "train", "selection": "last", "superclass": False},
            "metrics": metrics, "created": "2026-11-24T12:00:00Z"}


def write_jsonl(path, lines) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line if isinstance(line, str) else json.dumps(line) + "\n" for line in lines))


def test_read_records_skips_corrupt_and_partial_lines_naming_file_and_line(tmp_path):
    path = tmp_path / "a" / "run" / "metrics.jsonl"
    write_jsonl(path, [record(0, acc=0.5), '{"run": "x", "metrics": {"acc": 0.\n', "\n", "[1, 2]\n",
                       record(1, acc=0.6), '{"run": "half a line, the job was killed mid-write\n',
                       {**record(3, acc=0.1), "protocol": "k=20"}, {**record(4, acc=0.1), "dataset": None}])
    write_jsonl(tmp_path / "b" / "metrics.jsonl", [record(2, acc=0.7)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = results.read_records(tmp_path)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 5
    assert [m.split(": skipped")[0] for m in messages] == [f"{path}:{line}" for line in (2, 4, 6, 7, 8)]
    assert "not a metrics record" in messages[1] and "not a metrics record" in messages[3]
    assert "no dataset named" in messages[4]
    assert [r["seed"] for r in found] == [0, 1, 2]
    assert found[0]["_file"] == str(path)


@pytest.mark.parametrize("changes, fault", [
    ({"dataset": "../../elsewhere/evil"}, "dataset '../../elsewhere/evil' could not name a table's files"),
    ({"dataset": "x/y"}, "dataset 'x/y' could not name"),
    ({"dataset": ""}, "dataset '' could not name"),
    ({"dataset": ".hidden"}, "dataset '.hidden' could not name"),
    ({"seed": [1]}, "seed [1] is not a whole number"),
    ({"epoch": 2.5}, "epoch 2.5 is not a whole number"),
    ({"step": True}, "step True is not a whole number"),
    ({"run": {"a": 1}}, "run {'a': 1} is not text"),
    ({"method": 3}, "method 3 is not text"),
    ({"eval": None}, "eval None is none of knn, linear, cluster: not a metrics record of this suite"),
    ({"eval": "weird"}, "eval 'weird' is none of knn, linear, cluster: not a metrics record of this suite"),
    ({"protocol": None}, "no protocol: not a metrics record of this suite"),
])
def test_a_record_whose_fields_could_not_name_a_table_or_make_a_row_is_skipped(tmp_path, changes, fault):
    """A record's dataset names its table's files (a path in it wrote them outside --out); a field of another type
    than the engine writes stopped the tables with a traceback; another program's record (no evaluation named) made
    a row of its own without a number or a word."""
    path = tmp_path / "run" / "metrics.jsonl"
    write_jsonl(path, [record(0, acc=0.5), {**record(1, acc=0.6), **changes}])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = results.read_records(tmp_path)
    assert len(caught) == 1 and str(caught[0].message).startswith(f"{path}:2: skipped ({fault}")
    assert [r["seed"] for r in found] == [0]
    assert not results.records_frame(found).empty


def test_a_record_file_that_cannot_be_read_is_named_and_the_others_are_read(tmp_path):
    write_jsonl(tmp_path / "good" / "metrics.jsonl", [record(0, acc=0.5)])
    (tmp_path / "gone").mkdir()
    (tmp_path / "gone" / "metrics.jsonl").symlink_to(tmp_path / "nowhere" / "metrics.jsonl")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = results.read_records(tmp_path)
    assert [str(w.message) for w in caught] == [
        f"{tmp_path / 'gone' / 'metrics.jsonl'}: skipped (cannot be read: No such file or directory)"]
    assert [r["seed"] for r in found] == [0]


def test_a_folder_the_tables_cannot_enter_is_named_not_left_out_in_silence(tmp_path):
    """Its runs were missing from a row's n without a word. Root reads any folder: the program runs without the
    capabilities that let it (setpriv), as any other user would."""
    write_jsonl(tmp_path / "root" / "a_s0" / "metrics.jsonl", [record(0, acc=0.5)])
    write_jsonl(tmp_path / "root" / "a_s1" / "metrics.jsonl", [record(1, acc=0.6)])
    (tmp_path / "root" / "a_s1").chmod(0)
    prefix = ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
              "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    try:
        result = subprocess.run([*prefix, sys.executable, "collect_results.py", "--root", str(tmp_path / "root"),
                                 "--out", str(tmp_path / "out"), "--published", "", "--plots", "false"],
                                cwd=ROOT, capture_output=True, text=True, timeout=120,
                                env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    finally:
        (tmp_path / "root" / "a_s1").chmod(0o755)
    assert_ok(result)
    assert (f"warning: {tmp_path / 'root' / 'a_s1'}: cannot be read (Permission denied): the runs below it are left "
            f"out") in result.stderr
    assert result.stderr.count("cannot be read") == 1  # once, though the curves walk the folders again


def test_runs_linked_into_the_root_are_read_each_once(tmp_path):
    """A run kept on scratch space and linked into the results folder counts; a link back up (a cycle) and a second
    link to the same run do not make the walk loop or read a file twice."""
    write_jsonl(tmp_path / "root" / "here" / "metrics.jsonl", [record(0, acc=0.5)])
    write_jsonl(tmp_path / "scratch" / "there" / "metrics.jsonl", [record(1, acc=0.6)])
    (tmp_path / "scratch" / "there" / "train_log.jsonl").write_text("")
    (tmp_path / "root" / "there").symlink_to(tmp_path / "scratch" / "there")
    (tmp_path / "root" / "there_again").symlink_to(tmp_path / "scratch" / "there")
    (tmp_path / "root" / "here" / "up").symlink_to(tmp_path / "root")
    (tmp_path / "root" / "a_link_first_in_name_order").symlink_to(tmp_path / "root" / "here")
    found = results.read_records(tmp_path / "root")
    assert sorted(r["seed"] for r in found) == [0, 1]
    assert {r["_file"] for r in found} == {str(tmp_path / "root" / name / "metrics.jsonl") for name in ("here", "there")}
    assert results.files_named(tmp_path / "root", "train_log.jsonl") == [tmp_path / "root" / "there" / "train_log.jsonl"]


# Three seeds of one protocol: acc 81, 84, 90 -> mean 85, sample std sqrt(((-4)^2 + (-1)^2 + 5^2) / 2) = sqrt(21).
SEEDS = [record(0, acc=0.81, nmi=0.70), record(1, acc=0.84, nmi=0.72), record(2, acc=0.90, nmi=0.71)]


def test_aggregate_mean_std_n_over_seeds():
    other_k = record(0, protocol={"clusters": 20, "fit_on": "train", "selection": "last", "superclass": False},
                     acc=0.95)
    knn = record(0, eval_kind="knn", protocol={"k": 200, "temperature": 0.1}, top1=0.5, top5=0.9)
    table = results.aggregate(results.records_frame([*SEEDS, other_k, knn]))
    assert len(table) == 3
    row = table[(table["eval"] == "cluster") & (table["protocol"].str.contains("clusters=10"))].iloc[0]
    assert row["acc_mean"] == pytest.approx(85.0, abs=1e-9)
    assert row["acc_std"] == pytest.approx(math.sqrt(21), abs=1e-9)
    assert row["nmi_mean"] == pytest.approx(71.0, abs=1e-9) and row["nmi_std"] == pytest.approx(1.0, abs=1e-9)
    assert row["n"] == 3 and math.isnan(row["top1_mean"])
    single = table[table["protocol"].str.contains("clusters=20")].iloc[0]
    assert (single["n"], single["acc_mean"]) == (1, pytest.approx(95.0)) and math.isnan(single["acc_std"])
    knn_row = table[table["eval"] == "knn"].iloc[0]
    assert (knn_row["top1_mean"], knn_row["top5_mean"], knn_row["n"]) == (pytest.approx(50.0), pytest.approx(90.0), 1)


def test_aggregate_counts_an_evaluation_repeated_on_one_checkpoint_once():
    rerun = {**SEEDS[2], "metrics": {"acc": 0.87, "nmi": 0.71}, "created": "2026-11-25T12:00:00Z"}
    table = results.aggregate(results.records_frame([*SEEDS, rerun]))
    row = table.iloc[0]
    assert row["n"] == 3  # three seeds, not four records
    assert row["acc_mean"] == pytest.approx(84.0)  # the newest record of seed 2 counts: (81 + 84 + 87) / 3


def test_aggregate_counts_the_final_checkpoint_and_its_epoch_copy_once():
    """checkpoint.pth and checkpoint_ep0200.pth, saved together at the end of epoch 200, are one state of the weights:
    a grid evaluating both (evals.epochs [200, final]) has one seed, not two."""
    copy = {**SEEDS[0], "checkpoint": "checkpoint_ep0200.pth", "step": 0}
    table = results.aggregate(results.records_frame([copy, SEEDS[0]]))
    assert list(table["n"]) == [1] and table.iloc[0]["acc_mean"] == pytest.approx(81.0)


def test_a_record_of_a_checkpoint_saved_mid_epoch_is_left_out_with_a_warning():
    mid_epoch = {**SEEDS[1], "run": SEEDS[0]["run"], "seed": 0, "step": 7, "_file": "r/metrics.jsonl"}
    with pytest.warns(UserWarning, match=r"r/metrics.jsonl: the record of checkpoint.pth at epoch 201 step 7 \(saved"):
        table = results.aggregate(results.records_frame([SEEDS[0], mid_epoch]))
    assert list(table["n"]) == [1] and table.iloc[0]["acc_mean"] == pytest.approx(81.0)


def test_aggregate_separates_datasets_epochs_and_protocols():
    frame = results.records_frame([*SEEDS, record(0, epoch=100, acc=0.5), record(0, dataset="cifar10", acc=0.4),
                                   record(0, protocol={"clusters": 10, "superclass": True}, acc=0.3)])
    table = results.aggregate(frame)
    assert sorted(zip(table["dataset"], table["epoch"], table["n"])) == [
        ("cifar10", 200, 1), ("digits", 100, 1), ("digits", 200, 1), ("digits", 200, 3)]


PUBLISHED = """method,dataset,backbone,eval,epochs,metric,value,source,protocol
swav,digits,resnet50,cluster,200,acc,90.0,another network,k-means K=10
swav,digits,resnet18_cifar_w16,cluster,200,acc,80.5,Caron et al. 2020,k-means K=10
swav,digits,resnet18_cifar_w16,cluster,400,acc,99.0,Caron et al. 2020,k-means K=10
swav,digits,resnet18_cifar_w16,knn,200,top1,70.0,someone,k=200
pixels,digits,,cluster,,acc,66.6,scikit-learn,k-means on pixels
"""


def test_attach_published_matches_method_dataset_backbone_eval_epochs_and_computes_diff():
    records = [*SEEDS, record(0, epoch=100, acc=0.5), record(0, method="pixels", epoch=None, acc=0.7),
               record(0, method="npid", acc=0.6)]
    table = results.attach_published(results.aggregate(results.records_frame(records)),
                                     pd.read_csv(io.StringIO(PUBLISHED)))
    by = {(r["method"], str(r["epoch"])): r for _, r in table.iterrows()}
    swav = by[("swav", "200")]
    assert swav["published"] == 80.5 and swav["diff"] == 4.5  # 85.0 - 80.5
    assert swav["source"] == "Caron et al. 2020 (k-means K=10)"
    assert by[("pixels", "-")]["published"] == 66.6 and by[("pixels", "-")]["diff"] == pytest.approx(3.4)
    for unmatched in (("swav", "100"), ("npid", "200")):  # other epochs, a method without published numbers
        assert by[unmatched]["published"] is None and by[unmatched]["diff"] is None
    assert results.attach_published(table, None) is table


def test_a_superclass_row_gets_no_published_number():
    """CIFAR-100's superclass ACC (20 classes) is not the 100-class ACC a paper gives for the dataset."""
    protocol = {"clusters": 10, "fit_on": "train", "selection": "last"}
    records = [record(0, acc=0.85, protocol={**protocol, "superclass": False}),
               record(0, acc=0.95, protocol={**protocol, "superclass": True})]
    table = results.attach_published(results.aggregate(results.records_frame(records)),
                                     pd.read_csv(io.StringIO(PUBLISHED)))
    by = {"superclass" in row["protocol"]: row for _, row in table.iterrows()}
    assert by[False]["published"] == 80.5 and by[False]["diff"] == 4.5
    assert by[True]["published"] is None and by[True]["diff"] is None


@pytest.mark.parametrize("protocol", [
    {"clusters": 100, "mapping": "majority"},   # over-clustering: more clusters score higher
    {"selection": "all-heads", "head": 3},      # a head other than the chosen one
    {"assignment": "kmeans"},                   # k-means on the features of a method whose paper gives its head's
])
def test_rows_measuring_something_else_than_the_papers_number_get_none(protocol):
    """A 100-cluster majority ACC, a head that was not chosen and k-means on a SCAN run's backbone got the 10-cluster
    ACC a paper gives for its chosen head, and a diff beside it. (The split is not compared: EmbedUL's paper gives its ACC on the training split.)"""
    base = {"clusters": 10, "fit_on": "train", "selection": "last", "superclass": False, "mapping": "hungarian",
            "split": "test"}
    records = [record(0, acc=0.85, protocol=base), record(0, acc=0.95, protocol={**base, **protocol})]
    table = results.attach_published(results.aggregate(results.records_frame(records)),
                                     pd.read_csv(io.StringIO(PUBLISHED)))
    by = {round(row["acc_mean"], 6): row for _, row in table.iterrows()}
    assert by[85.0]["published"] == 80.5 and by[85.0]["diff"] == 4.5
    assert by[95.0]["published"] is None and by[95.0]["diff"] is None


def test_the_training_split_meets_a_number_published_on_it():
    """EmbedUL publishes its ACC on the training split (eval_cluster.py --split train scores it): a review's rule that
    left the training split out took that number away from the one row that matches it."""
    assert results.comparable_protocol("assignment=heads selection=lowest-loss split=train", "cluster")
    assert not results.comparable_protocol("assignment=heads selection=all-heads split=test", "cluster")


def test_a_run_extended_on_resume_gets_no_published_number(tmp_path):
    """Trained 100 epochs, then extended to 200: the number published for 200 epochs from the start was set beside
    it (the rows of its settings keep resume_changes), as beside a run trained 200 epochs from the start."""
    root = tmp_path / "runs"
    for name, seed, changes in (("extended", 0, [{"epoch": 100, "step": 0, "before": {"epochs": 100},
                                                  "after": {"epochs": 200}}]), ("whole", 1, [])):
        write_trained_run(root, name, seed, 0.85, dataset="digits")
        config = yaml.safe_load((root / name / "config.yaml").read_text())
        (root / name / "config.yaml").write_text(yaml.safe_dump({**config, "resume_changes": changes}))
        write_jsonl(root / name / "metrics.jsonl", [{**record(seed, run=name, acc=0.85), **CLEAN}])
    table = results.attach_published(results.aggregate(results.records_frame(results.read_records(root))),
                                     pd.read_csv(io.StringIO(PUBLISHED)))
    by = {row["recipe"]: row for _, row in table.iterrows()}
    assert by["resume_changes=none"]["published"] == 80.5
    assert by["resume_changes=epochs 100->200 at the end of epoch 100"]["published"] is None
    assert sorted(table["resumed_with_changes"]) == [False, True]
    # a run whose config.yaml predates resume_changes shares the extended run's row: the row still gets none
    config = yaml.safe_load((root / "whole" / "config.yaml").read_text())
    (root / "whole" / "config.yaml").write_text(yaml.safe_dump({k: v for k, v in config.items()
                                                                if k != "resume_changes"}))
    table = results.attach_published(results.aggregate(results.records_frame(results.read_records(root))),
                                     pd.read_csv(io.StringIO(PUBLISHED)))
    assert list(table["n"]) == [2] and list(table["published"]) == [None]


def test_a_cached_features_probe_does_not_meet_the_published_linear_number():
    """--cached_features trains one linear layer on features of unaugmented images extracted once, a protocol no
    upstream probe follows: it got the published number and a diff beside it all the same. Probes with other flags
    keep it, their protocol shown beside it."""
    published = pd.read_csv(io.StringIO(PUBLISHED + "swav,digits,resnet18_cifar_w16,linear,200,top1,84.9,Un-Mix,"
                                                    "linear 100 ep\n"))
    default = {"augmentation": "augmented", "epochs": 100, "lr": 0.3, "batch_size": 32, "weight_decay": 1e-6,
               "features": "backbone", "fit_on": "train", "selection": "last"}
    probes = {"default": default, "cached": {**default, "augmentation": "cached"}, "lr": {**default, "lr": 0.1}}
    records = [record(0, eval_kind="linear", protocol=protocol, run=name, top1=0.8)
               for name, protocol in probes.items()]
    table = results.attach_published(results.aggregate(results.records_frame(records)), published)
    by = {row["protocol"]: row["published"] for _, row in table.iterrows()}
    assert sorted((("augmentation=cached" in label), value) for label, value in by.items()) == [
        (False, 84.9), (False, 84.9), (True, None)]


def test_an_image_folder_meets_the_numbers_published_for_the_dataset_it_is_named_after():
    """ImageNet trained through --dataset imagefolder is recorded as imagefolder, its folder's name in the protocol:
    its rows met no published ImageNet number."""
    published = pd.read_csv(io.StringIO(PUBLISHED + "swav,imagenet,resnet18_cifar_w16,cluster,200,acc,41.1,paper,"
                                                    "head 0\n"))
    protocol = {"data": "ImageNet", "train_images": 12, "clusters": 10, "fit_on": "train", "selection": "last"}
    folder = record(0, dataset="imagefolder", protocol=protocol, acc=0.45)
    other = record(0, dataset="imagefolder", protocol={**protocol, "data": "flowers"}, acc=0.45)
    table = results.attach_published(results.aggregate(results.records_frame([folder, other])), published)
    by = {"ImageNet" in row["protocol"]: row for _, row in table.iterrows()}
    assert by[True]["published"] == 41.1 and by[True]["diff"] == pytest.approx(3.9)
    assert by[False]["published"] is None
    assert results.published_for(published, {"imagefolder", "imagenet"}, {"swav"})["value"].tolist() == [41.1]


def test_a_checkpoint_in_the_middle_of_a_longer_run_gets_no_published_number(tmp_path):
    """The epoch-200 checkpoint of a 400-epoch run (--checkpoint_epochs) is mid-schedule: only the run that ended at
    epoch 200 is compared with the number published for 200 epochs."""
    for name, epochs, acc in (("ended", 200, 0.85), ("longer", 400, 0.60)):
        run = tmp_path / name
        write_jsonl(run / "metrics.jsonl", [record(0, run=name, acc=acc)])
        (run / "config.yaml").write_text(yaml.safe_dump({"args": {"method": "swav", "epochs": epochs}}))
    table = results.attach_published(results.aggregate(results.records_frame(results.read_records(tmp_path))),
                                     pd.read_csv(io.StringIO(PUBLISHED)))
    rows = {row["recipe"]: row for _, row in table.iterrows()}  # the runs differ in --epochs: a row each
    assert list(table["mid_run"]) == [False, True] and table["epoch"].tolist() == [200, 200]
    assert rows["epochs=200"]["published"] == 80.5 and rows["epochs=200"]["diff"] == 4.5
    assert rows["epochs=400"]["published"] is None and rows["epochs=400"]["diff"] is None


def test_a_record_of_another_directorys_checkpoint_is_left_out_of_the_tables(tmp_path):
    """eval_* --checkpoint OTHER/checkpoint.pth records under the run, by the file's full path: not the run's result."""
    foreign = {**record(0, run="run", acc=0.1), "checkpoint": "/x/checkpoint.pth"}
    write_jsonl(tmp_path / "run" / "metrics.jsonl", [record(0, run="run", acc=0.8), foreign])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frame = results.records_frame(results.read_records(tmp_path))
    assert frame["acc"].tolist() == [80.0]
    assert any("/x/checkpoint.pth, a checkpoint of another directory" in str(w.message) for w in caught)


def test_chosen_heads_of_different_indices_are_seeds_of_one_row():
    """Each seed's run chooses its own head by loss: the chosen heads' numbers are one result, averaged."""
    def chosen(seed, head, acc):
        return record(seed, protocol={"assignment": "head", "head": head, "chosen": True, "clusters": 10,
                                      "selection": "lowest-loss"}, acc=acc)
    other = record(0, protocol={"assignment": "head", "head": 1, "chosen": False, "clusters": 10,
                                "selection": "all-heads"}, acc=0.3)
    frame = results.records_frame([chosen(0, 3, 0.6), chosen(1, 7, 0.7), other])
    table = results.aggregate(frame)
    picked = table[table["protocol"].str.contains("chosen")]
    assert len(picked) == 1 and picked["n"].tolist() == [2] and picked["acc_mean"].tolist() == [pytest.approx(65.0)]
    assert "head=" not in picked["protocol"].iloc[0] and sorted(frame["head"].dropna()) == [1, 3, 7]
    assert table[~table["protocol"].str.contains("chosen")]["protocol"].str.contains("head=1").all()


def test_display_table_formats_mean_std_and_n():
    table = results.aggregate(results.records_frame([*SEEDS, record(0, epoch=100, acc=0.5)]))
    shown = results.display_table(table)
    assert list(shown["acc"]) == ["50.00", "85.00 ± 4.58"]
    assert list(shown["n"]) == [1, 3] and "top1" not in shown and "acc_n" not in table


def test_a_value_averaged_over_fewer_runs_than_the_row_says_how_many():
    """The row's n beside a metric that one of its runs lacks (an NMI left out) read as the mean of all of them."""
    with pytest.warns(UserWarning, match="its nmi averages 2 of its 3 runs"):
        table = results.aggregate(results.records_frame([record(0, acc=0.8, nmi=0.70), record(1, acc=0.9, nmi=0.74),
                                                         record(2, acc=0.85)]))
    shown = results.display_table(table)
    assert (list(shown["acc"]), list(shown["nmi"]), list(shown["n"])) == (["85.00 ± 5.00"], ["72.00 ± 2.83 (n=2)"],
                                                                          [3])
    assert list(table["nmi_n"]) == [2] and "acc_n" not in table


def test_collect_results_writes_tables_per_dataset(tmp_path):
    root, out = tmp_path / "runs", tmp_path / "tables"
    for i, rec in enumerate(SEEDS):
        write_jsonl(root / f"swav_digits_s{i}" / "metrics.jsonl", [rec])
        (root / f"swav_digits_s{i}" / "config.yaml").write_text(yaml.safe_dump({"args": {"epochs": 200, "seed": i}}))
    broken = root / "swav_digits_s0" / "metrics.jsonl"
    broken.write_text(broken.read_text() + '{"run": "cut off')
    write_jsonl(root / "deep" / "pixels_digits" / "metrics.jsonl", [record(0, method="pixels", epoch=None, acc=0.7)])
    write_jsonl(root / "swav_cifar10_s0" / "metrics.jsonl",
                [record(0, dataset="cifar10", eval_kind="knn", protocol={"k": 200, "temperature": 0.1}, top1=0.8123,
                        top5=0.9)])
    (root / "swav_cifar10_s0" / "config.yaml").write_text(yaml.safe_dump({"args": {"epochs": 200}}))
    published = tmp_path / "published.csv"
    published.write_text(PUBLISHED)
    result = run_script("collect_results.py", "--root", root, "--out", out, "--published", published,
                        "--plots", "false")
    assert_ok(result)
    assert result.stderr.strip() == f"warning: {broken}:2: skipped (Unterminated string starting at: line 1 " \
                                    f"column 9 (char 8))"
    assert "## cifar10" in result.stdout and "## digits" in result.stdout and "85.00 ± 4.58" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == [".tables_by_collect_results", "cifar10.csv", "cifar10.md",
                                                     "cifar10.tex", "digits.csv", "digits.md", "digits.tex"]
    digits = pd.read_csv(out / "digits.csv")
    swav = digits[digits["method"] == "swav"].iloc[0]
    assert (swav["n"], swav["acc_mean"], swav["published"], swav["diff"]) == (3, pytest.approx(85.0), 80.5, 4.5)
    assert swav["acc_std"] == pytest.approx(math.sqrt(21))
    assert digits[digits["method"] == "pixels"].iloc[0]["acc_mean"] == pytest.approx(70.0)
    cifar = pd.read_csv(out / "cifar10.csv")
    assert list(cifar["top1_mean"]) == [pytest.approx(81.23)] and cifar["published"].isna().all()
    markdown = (out / "digits.md").read_text()
    assert markdown.startswith("# digits\n") and "| 85.00 ± 4.58 |" in markdown
    latex = (out / "digits.tex").read_text()
    assert "\\begin{tabular}" in latex and "85.00 ± 4.58" in latex and "fit\\_on=train" in latex


def test_tables_keep_a_pipe_or_a_less_than_sign_in_their_cell_in_every_format(tmp_path):
    """A `|` in a published source split its Markdown cell (the row got an extra column), `->` in a recipe
    printed as "-¿" in LaTeX's default font encoding, and the LaTeX table wrote the published number and its diff
    as 80.500000 and 4.500000 where the Markdown said 80.5 and 4.5; a blank protocol read "nan"."""
    root, out = tmp_path / "runs", tmp_path / "tables"
    for seed, epochs in ((0, 200), (1, 100)):  # two recipes, the second extended from 100 to 200 epochs
        name = f"swav_digits_s{seed}"
        write_jsonl(root / name / "metrics.jsonl", [record(seed, run=name, acc=0.85)])
        changes = [{"epoch": 100, "step": 0, "before": {"epochs": 100}, "after": {"epochs": 200}}] if seed else []
        (root / name / "config.yaml").write_text(yaml.safe_dump({"args": {"epochs": 200}, "resume_changes": changes}))
    published = tmp_path / "published.csv"
    published.write_text("method,dataset,backbone,eval,epochs,metric,value,source,protocol\n"
                         "swav,digits,resnet18_cifar_w16,cluster,200,acc,80.5,Smith | Jones,\n")
    assert_ok(run_script("collect_results.py", "--root", root, "--out", out, "--published", published,
                         "--plots", "false", "--curves", "false"))
    markdown = (out / "digits.md").read_text().split("\n\n")
    header, rule, *rows = markdown[1].splitlines()
    assert {len(re.findall(r"(?<!\\)\|", line)) for line in (header, rule, *rows)} == {header.count("|")}
    assert "| 80.5 | acc | 4.5 | Smith \\| Jones |" in markdown[1]
    latex = (out / "digits.tex").read_text()
    assert "& 80.5 & acc & 4.5 & Smith \\textbar{} Jones \\\\" in latex
    assert "epochs 100-\\textgreater{}200" in latex and "->" not in latex


def test_combined_never_replaces_a_file_that_is_not_combined_tables(tmp_path, run_in_process, capsys):
    """--combined wrote over whatever it named: a run's checkpoint.pth became a Markdown table. Refused before any
    table is written; combined tables written earlier are replaced."""
    root = tmp_path / "runs"
    write_jsonl(root / "swav_digits_s0" / "metrics.jsonl", [SEEDS[0]])
    kept = root / "swav_digits_s0" / "checkpoint.pth"
    kept.write_bytes(b"weights")
    notes = tmp_path / "notes.md"
    notes.write_text("# my study\n")
    headed = tmp_path / "analysis.md"  # a heading as the combined tables' (they were told by "## " alone)
    headed.write_text("## My notes\n\nhand-written analysis\n")
    common = ["--root", root, "--out", tmp_path / "tables", "--published", "", "--plots", "false", "--curves", "false"]
    for target, words in ((kept, "name a .md file"), (notes, "exists and does not hold combined tables"),
                          (headed, "exists and does not hold combined tables"), (tmp_path, "name a .md file"),
                          (tmp_path / "tables" / "digits.md", "is the table of digits that --out")):
        result = run_in_process("collect_results.py", *common, "--combined", target)
        assert result.returncode == 2 and words in result.stderr, result.stderr
    assert kept.read_bytes() == b"weights" and notes.read_text() == "# my study\n"
    assert headed.read_text() == "## My notes\n\nhand-written analysis\n"
    assert not (tmp_path / "tables").exists()
    combined = tmp_path / "study.md"
    collect = entry_module("collect_results")
    for _ in range(2):  # written, then replaced
        collect.main([str(a) for a in (*common, "--combined", combined)])
        assert combined.read_text().startswith(f"{COMBINED_MARK}\n\n## digits\n")
        # (it said "tables and all of them in study.md written to tables/")
        assert capsys.readouterr().out.endswith(f"\ntables written to {tmp_path / 'tables'}/\n"
                                                f"every dataset's table also in {combined}\n")


def test_collect_results_defaults_write_beside_the_runs_not_into_the_shipped_tables(tmp_path, monkeypatch, capsys):
    """In a copy of the repository's results/, run from its parent with only --root: records of a dataset whose
    table ships go to ROOT/tables, and results/ stays byte for byte as it was (a copy, so that a regression cannot
    overwrite the real tables)."""
    shutil.copytree(ROOT / "results", tmp_path / "repo" / "results")
    root = tmp_path / "runs"
    write_jsonl(root / "swav_fm" / "metrics.jsonl", [record(0, dataset="fashion_mnist", acc=0.25)])
    shipped = snapshot(tmp_path / "repo" / "results")
    assert "fashion_mnist.csv" in shipped
    monkeypatch.chdir(tmp_path / "repo")
    entry_module("collect_results").main(["--root", str(root), "--plots", "false"])
    assert snapshot(tmp_path / "repo" / "results") == shipped
    assert sorted(p.name for p in (root / "tables").iterdir()) == [".tables_by_collect_results", "fashion_mnist.csv",
                                                                   "fashion_mnist.md", "fashion_mnist.tex"]
    assert pd.read_csv(root / "tables" / "fashion_mnist.csv")["acc_mean"].tolist() == [pytest.approx(25.0)]
    assert f"tables written to {root / 'tables'}/" in capsys.readouterr().out


def test_tables_built_away_from_the_repository_root_take_the_checkouts_published_numbers(tmp_path, monkeypatch,
                                                                                        capsys):
    """From another directory, the default file is the one of the checkout the package runs from; an installed
    copy (no checkout around it) has none and says so."""
    root = tmp_path / "runs"
    write_jsonl(root / "swav_c10" / "metrics.jsonl", [record(0, dataset="cifar10", acc=0.25)])
    monkeypatch.chdir(tmp_path)
    entry_module("collect_results").main(["--root", str(root), "--plots", "false"])
    assert f"published numbers from {ROOT / 'results' / 'published.csv'}" in capsys.readouterr().out
    assert "published" in pd.read_csv(root / "tables" / "cifar10.csv").columns
    monkeypatch.setattr(config, "__file__", str(tmp_path / "site" / "clusterlab" / "config.py"))  # installed
    entry_module("collect_results").main(["--root", str(root), "--plots", "false"])
    assert f"note: no results/published.csv in {tmp_path}" in capsys.readouterr().out
    assert "published" not in pd.read_csv(root / "tables" / "cifar10.csv").columns


CLEAN = {"git_commit": "c0ffee", "git_dirty": False}
DIRTY = {"git_commit": "c0ffee", "git_dirty": True}


def write_run(root, name: str, evaluated: dict, trained: dict | None, **fields) -> None:
    """A run directory: its metrics record made by code in the git state `evaluated`, and a config.yaml written
    by code in the state `trained` (None: a baseline, which has no config.yaml)."""
    write_jsonl(root / name / "metrics.jsonl", [{**record(run=name, **fields), **evaluated}])
    if trained is not None:
        (root / name / "config.yaml").write_text(yaml.safe_dump({"program": "main_pretrain.py", "args": {},
                                                                 **trained}))


def test_revision_of_a_row_is_its_most_doubtful_run_or_evaluation(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "clean", CLEAN, CLEAN, seed=0, epoch=10, acc=0.5)
    write_run(root, "trained_dirty", CLEAN, DIRTY, seed=0, epoch=20, acc=0.5)
    write_run(root, "evaluated_dirty", DIRTY, CLEAN, seed=0, epoch=30, acc=0.5)
    write_run(root, "old_suffix", CLEAN, {"git_commit": "c0ffee-dirty"}, seed=0, epoch=40, acc=0.5)
    write_run(root, "old_clean", CLEAN, {"git_commit": "c0ffee"}, seed=0, epoch=50, acc=0.5)
    write_run(root, "no_commit", CLEAN, {}, seed=0, epoch=60, acc=0.5)
    write_run(root, "installed_copy", {"git_commit": None, "git_dirty": None}, CLEAN, seed=0, epoch=70, acc=0.5)
    write_run(root, "pixels", CLEAN, None, method="pixels", epoch=None, acc=0.5)
    # a linear probe finished by clean code, whose first start ran dirty code (the record's trained_by)
    write_run(root, "probe_resumed", {**CLEAN, "trained_by": [DIRTY, CLEAN]}, CLEAN, seed=0, epoch=75, acc=0.5)
    # Three seeds of one row: clean, unknown (an old record without git fields), dirty -> dirty.
    write_run(root, "s0", CLEAN, CLEAN, seed=0, epoch=80, acc=0.5)
    write_run(root, "s1", {}, {}, seed=1, epoch=80, acc=0.5)
    write_run(root, "s2", CLEAN, DIRTY, seed=2, epoch=80, acc=0.5)
    write_run(root, "u0", CLEAN, CLEAN, seed=0, epoch=90, acc=0.5)
    write_run(root, "u1", {}, {}, seed=1, epoch=90, acc=0.5)
    frame = results.records_frame(results.read_records(root))
    by_run = dict(zip(frame["run"], frame["revision"]))
    assert by_run == {"clean": "clean", "trained_dirty": "dirty", "evaluated_dirty": "dirty", "old_suffix": "dirty",
                      "old_clean": "clean", "no_commit": "unknown", "installed_copy": "unknown", "pixels": "clean",
                      "probe_resumed": "dirty", "s0": "clean", "s1": "unknown", "s2": "dirty", "u0": "clean",
                      "u1": "unknown"}
    table = results.aggregate(frame)
    by_epoch = dict(zip(table["epoch"].astype(str), table["revision"]))
    assert (by_epoch["80"], by_epoch["90"], by_epoch["10"], by_epoch["-"]) == ("dirty", "unknown", "clean", "clean")
    assert results.revision_footnote(frame).splitlines() == [
        f"revision unknown: {results.REVISION_NOTES['unknown']}: installed_copy, no_commit, s1, u1.",
        f"revision dirty: {results.REVISION_NOTES['dirty']}: evaluated_dirty, old_suffix, probe_resumed, s2, "
        f"trained_dirty."]

    out = tmp_path / "tables"
    assert_ok(run_script("collect_results.py", "--root", root, "--out", out, "--published", "", "--plots", "false"))
    written = pd.read_csv(out / "digits.csv")
    assert dict(zip(written["epoch"].astype(str), written["revision"])) == by_epoch
    markdown = (out / "digits.md").read_text()
    assert "revision" in [cell.strip() for cell in markdown.splitlines()[2].split("|")]
    assert markdown.rstrip().endswith(": evaluated_dirty, old_suffix, probe_resumed, s2, trained_dirty.")


def test_revision_covers_every_start_and_the_runs_its_weights_started_from():
    """config.yaml's git fields say what its last start ran: a run trained dirty, then resumed clean, read clean.
    Its trained_by (every start) and its pretrained_from chain's (the first stage's starts) are read too."""
    resumed = {**CLEAN, "trained_by": [DIRTY, CLEAN]}
    assert results.revision(CLEAN, resumed) == "dirty"
    assert results.revision(CLEAN, {**CLEAN, "trained_by": [CLEAN]}) == "clean"
    assert results.revision(CLEAN, {**CLEAN, "trained_by": [CLEAN, {"git_commit": None}]}) == "unknown"
    first_stage = {"method": "swav", "trained_by": [CLEAN, DIRTY]}
    assert results.revision(CLEAN, {**CLEAN, "trained_by": [CLEAN], "pretrained_from": first_stage}) == "dirty"
    scan = {"method": "scan", "trained_by": [CLEAN], "pretrained_from": first_stage}
    assert results.revision(CLEAN, {**CLEAN, "trained_by": [CLEAN], "pretrained_from": scan}) == "dirty"
    # runs written before trained_by: their last start, and no evidence from an origin that does not say
    assert results.revision(CLEAN, {**CLEAN, "pretrained_from": {"method": "swav"}}) == "clean"


def test_a_clean_table_has_no_footnote(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "clean", CLEAN, CLEAN, acc=0.5)
    frame = results.records_frame(results.read_records(root))
    assert list(frame["revision"]) == ["clean"] and results.revision_footnote(frame) == ""


def test_the_footnote_names_the_runs_of_the_records_the_table_counts(tmp_path):
    """An evaluation by dirty code, then repeated by clean code: the row counts the newest record, and so does its
    footnote."""
    root = tmp_path / "runs"
    write_jsonl(root / "r" / "metrics.jsonl",
                [{**record(run="r", acc=0.4), **DIRTY}, {**record(run="r", acc=0.5), **CLEAN}])
    (root / "r" / "config.yaml").write_text(yaml.safe_dump({"program": "main_pretrain.py", "args": {}, **CLEAN}))
    out = tmp_path / "tables"
    assert_ok(run_script("collect_results.py", "--root", root, "--out", out, "--published", "", "--plots", "false"))
    written = pd.read_csv(out / "digits.csv")
    assert (list(written["revision"]), list(written["acc_mean"])) == (["clean"], [50.0])
    assert "revision dirty" not in (out / "digits.md").read_text()


def test_records_with_none_of_the_known_metrics_make_a_row_of_counts(tmp_path):
    root = tmp_path / "runs"
    write_jsonl(root / "r" / "metrics.jsonl", [record(run="r")])  # "metrics": {}
    out = tmp_path / "tables"
    assert_ok(run_script("collect_results.py", "--root", root, "--out", out, "--published", "", "--plots", "false"))
    assert list(pd.read_csv(out / "digits.csv")["n"]) == [1]


# What a SwAV run's config.yaml holds, in part: the recipe (configs/swav_cifar10.yaml without a queue) and the flags
# that do not change what it learns (results.NOT_SETTINGS), which differ from run to run.
SWAV_ARGS = {"config": "configs/swav_cifar10.yaml", "method": "swav", "dataset": "cifar10", "data_path": "/data/a",
             "download": False, "epochs": 200, "lr": 0.6, "nmb_crops": [2], "amp": "fp16", "compile": False,
             "channels_last": False, "device": "cuda", "workers": 4, "seed": 31, "output_dir": "runs/a",
             "checkpoint_epochs": [], "log_every": 50, "knn_monitor_every": 0, "knn_monitor_k": 200,
             "knn_monitor_features": "auto", "queue_length": 0, "epoch_queue_starts": 15}


def write_trained_run(root, name: str, seed: int, acc: float, pixels: bool = False, **args) -> None:
    """A run directory whose config.yaml records SWAV_ARGS with `args` (none for a pixel baseline), and its
    k-means record at epoch 200."""
    write_jsonl(root / name / "metrics.jsonl",
                [{**record(seed, method="pixels" if pixels else "swav", dataset="cifar10",
                           epoch=None if pixels else 200, run=name, acc=acc), **CLEAN}])
    if not pixels:
        config = {"program": "main_pretrain.py", "args": {**SWAV_ARGS, "seed": seed, "output_dir": f"runs/{name}",
                                                          **args}, **CLEAN}
        (root / name / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def rows_of(table):
    return {(row["method"], row.get("recipe", None)): (row["n"], round(row["acc_mean"], 6))
            for _, row in table.iterrows()}


def test_runs_trained_on_two_image_folders_are_two_recipes(tmp_path):
    """data_path differs per machine and is no setting; what the folder held is (config.yaml's training_set): runs
    trained on 4,000 and on 60,000 images, scored on one folder, were averaged as seeds of one row."""
    root = tmp_path / "runs"
    for name, seed, images, acc in (("small_s0", 0, 4000, 0.70), ("small_s1", 1, 4000, 0.72),
                                    ("large_s0", 0, 60000, 0.90)):
        write_trained_run(root, name, seed, acc, dataset="imagefolder", data_path=f"/data/{images}")
        config = yaml.safe_load((root / name / "config.yaml").read_text())
        (root / name / "config.yaml").write_text(yaml.safe_dump(
            {**config, "training_set": {"images": images, "fingerprint": f"digest{images}"}}))
    table = results.aggregate(results.records_frame(results.read_records(root)))
    assert rows_of(table) == {("swav", "training_set.images=4000 training_set.fingerprint=digest4000"): (2, 71.0),
                              ("swav", "training_set.images=60000 training_set.fingerprint=digest60000"): (1, 90.0)}


@pytest.mark.parametrize("args, split", [({"method": "unmix"}, True), ({"sync_bn": False}, True),
                                         ({"sync_bn": True}, False)])
def test_runs_on_other_numbers_of_processes_are_two_recipes_where_that_shapes_the_training(tmp_path, args, split):
    """Un-Mix (pairs drawn inside each rank's share) and local batch norm: fresh runs on 1 and on 2 processes were
    averaged as seeds of one row; with global batch norm they are seeds (2 processes compute what 1 does)."""
    root = tmp_path / "runs"
    for name, seed, world, acc in (("one_s0", 0, 1, 0.40), ("one_s1", 1, 1, 0.42), ("two_s0", 0, 2, 0.54)):
        write_trained_run(root, name, seed, acc, **args)
        config = yaml.safe_load((root / name / "config.yaml").read_text())
        (root / name / "config.yaml").write_text(yaml.safe_dump({**config, "world_size": world}))
    table = results.aggregate(results.records_frame(results.read_records(root)))
    assert rows_of(table) == ({("swav", "world_size=1"): (2, 41.0), ("swav", "world_size=2"): (1, 54.0)} if split
                              else {("swav", None): (3, 45.333333)})  # (the records' method: rows keep it)


def test_second_stages_of_first_stages_on_other_numbers_of_processes_are_two_recipes(tmp_path):
    """SCAN from an Un-Mix run on 1 process and from one on 2 were averaged as seeds: the origin kept no world size."""
    from clusterlab.methods.cluster_base import pretrained_origin

    def origin(world):
        return pretrained_origin(tmp_path / "unmix" / "checkpoint.pth", {
            "method": "unmix", "epoch": 1, "args": {"method": "unmix"}, "world_size": world})

    assert origin(2)["world_size"] == 2

    def settings(world):
        return results.run_settings({"args": {"method": "scan"}, "pretrained_from": origin(world)})

    assert settings(2)["pretrained.world_size"] == 2 and settings(1) != settings(2)


def test_scan_runs_mined_on_other_views_are_two_recipes_and_a_first_stage_on_another_folder_too(tmp_path):
    """neighbours_mined_on (not --mining_crop, which an older run lacks and a resume may change) tells SCAN runs
    apart; the training set of the run a stage started from counts as its other settings do."""
    def settings(mined, images):
        return results.run_settings({"args": {"method": "scan", "mining_crop": 0}, "neighbours_mined_on": {
            "crop": mined, "resize": mined}, "pretrained_from": {"method": "swav", "epoch": 10, "args": {},
                                                                 "training_set": {"images": images}}})
    assert settings(20, 4000)["neighbours_mined_on"] == 20 and "mining_crop" not in settings(20, 4000)
    assert settings(20, 4000)["pretrained.training_set.images"] == 4000
    assert settings(20, 4000) != settings(28, 4000) and settings(20, 4000) != settings(20, 60000)


def test_runs_of_different_recipes_get_rows_of_their_own_named_by_the_flags_that_differ(tmp_path):
    """The reviewer's case: SwAV with and without the queue, both seed 31, were one row of n=2 averaging 88.8 and
    70.0; now a row each, labelled by queue_length (what the two config.yaml differ in besides their paths)."""
    root = tmp_path / "runs"
    write_trained_run(root, "swav_c10", 31, 0.888)
    write_trained_run(root, "swav_c10_queue", 31, 0.700, config="configs/swav_cifar10_queue.yaml", queue_length=3840)
    frame = results.records_frame(results.read_records(root))
    table = results.aggregate(frame)
    assert list(table.columns[:7]) == ["dataset", "method", "backbone", "epoch", "eval", "protocol", "recipe"]
    assert rows_of(table) == {("swav", "queue_length=0"): (1, 88.8), ("swav", "queue_length=3840"): (1, 70.0)}


def test_seeds_of_each_recipe_are_averaged_within_their_recipe(tmp_path):
    """Two seeds of each recipe, trained on other machines and paths (flags that do not count), and a pixel
    baseline: a row per recipe with n=2, and the baseline's row as it was (no recipe to name)."""
    root = tmp_path / "runs"
    for seed, acc, acc_queue in ((0, 0.80, 0.70), (1, 0.90, 0.74)):
        write_trained_run(root, f"swav_s{seed}", seed, acc, data_path=f"/scratch/{seed}", device="cpu",
                          workers=seed, compile=bool(seed), channels_last=bool(seed), log_every=10 + seed,
                          knn_monitor_every=seed, checkpoint_epochs=[100] * seed, pretrained=f"runs/x{seed}")
        write_trained_run(root, f"swav_queue_s{seed}", seed, acc_queue, queue_length=3840, epoch_queue_starts=30)
    write_trained_run(root, "pixels", 0, 0.25, pixels=True)
    table = results.aggregate(results.records_frame(results.read_records(root)))
    assert rows_of(table) == {("pixels", ""): (1, 25.0),
                              ("swav", "queue_length=0 epoch_queue_starts=15"): (2, 85.0),
                              ("swav", "queue_length=3840 epoch_queue_starts=30"): (2, 72.0)}
    shown = results.display_table(table)
    assert list(shown.columns[5:7]) == ["protocol", "recipe"] and list(shown["n"]) == [1, 2, 2]


def test_seeds_of_one_recipe_stay_one_row_without_a_recipe_column(tmp_path):
    root = tmp_path / "runs"
    write_trained_run(root, "swav_s0", 0, 0.80, device="cpu", data_path="/x", pretrained="runs/emb_s0")
    write_trained_run(root, "swav_s1", 1, 0.90, device="cuda", workers=8, pretrained="runs/emb_s1")
    write_trained_run(root, "pixels", 0, 0.25, pixels=True)
    table = results.aggregate(results.records_frame(results.read_records(root)))
    assert "recipe" not in table
    assert rows_of(table) == {("pixels", None): (1, 25.0), ("swav", None): (2, 85.0)}


def test_recipe_labels_compare_the_flags_every_known_run_records():
    same = {"lr": 0.1, "nmb_crops": [2, 6]}
    # no config.yaml: a row of its own whether or not the known runs agree (it was averaged in where they agreed,
    # and apart where they did not, in rows of one table)
    assert results.recipe_labels([same, dict(same), None]) == ["", "", results.UNKNOWN_RECIPE]
    assert results.recipe_labels([None, None]) is None
    # a flag one run lacks (trained before it existed) is not compared; lists and booleans read as on the command line
    assert results.recipe_labels([{**same, "new_flag": 1}, same]) is None
    assert results.recipe_labels([same, {"lr": 0.1, "nmb_crops": [2]}, None]) == [
        "nmb_crops=2,6", "nmb_crops=2", results.UNKNOWN_RECIPE]
    assert results.recipe_labels([{"ema": True, "x": None}, {"ema": False, "x": []}]) == [
        "ema=true x=none", "ema=false x=[]"]
    assert results.run_settings(None) is None and results.run_settings({}) is None
    assert results.run_settings({"args": {"seed": 3, "output_dir": "r", "lr": 0.1}}) == {"lr": 0.1}


def test_a_run_started_from_another_has_that_runs_settings_among_its_own():
    """SCAN on a SwAV embedding and SCAN on an Un-Mix one are two recipes, not two seeds of one; the first stage's
    path and seed differ per seed and are not compared."""
    def scan(embedding_method, seed):
        embedding = {"checkpoint": f"/runs/{embedding_method}_s{seed}/checkpoint.pth", "method": embedding_method,
                     "epoch": 50, "args": {"method": embedding_method, "seed": seed, "lr": 0.6, "output_dir": "x"},
                     "pretrained_from": None}
        return {"args": {"method": "scan_selflabel", "seed": seed, "lr": 1e-4},
                "pretrained_from": {"checkpoint": f"/runs/scan_s{seed}/checkpoint.pth", "method": "scan", "epoch": 4,
                                    "args": {"method": "scan", "seed": seed, "lr": 1e-4, "pretrained": "p"},
                                    "pretrained_from": embedding}}

    assert results.run_settings(scan("swav", 0)) == {
        "method": "scan_selflabel", "lr": 1e-4, "pretrained.method": "scan", "pretrained.epoch": 4,
        "pretrained.step": 0, "pretrained.lr": 1e-4, "pretrained.pretrained.method": "swav",
        "pretrained.pretrained.epoch": 50, "pretrained.pretrained.step": 0, "pretrained.pretrained.lr": 0.6}
    settings = [results.run_settings(scan(method, seed)) for method in ("swav", "unmix") for seed in (0, 1)]
    assert results.recipe_labels(settings) == ["pretrained.pretrained.method=swav"] * 2 + [
        "pretrained.pretrained.method=unmix"] * 2
    # a run from scratch is a recipe of its own, not a seed of one from an embedding
    scratch = results.run_settings({"args": {"method": "sela", "seed": 0, "lr": 0.05, "pretrained": None}})
    embedded = results.run_settings({"args": {"method": "sela", "seed": 1, "lr": 0.05, "pretrained": "r"},
                                     "pretrained_from": {"method": "swav", "epoch": 50, "args": {}}})
    assert results.recipe_labels([scratch, embedded]) == ["pretrained.method=none", "pretrained.method=swav"]
    # and a run from an embedding that config.yaml does not describe (before pretrained_from) is neither
    older = results.run_settings({"args": {"method": "sela", "seed": 2, "lr": 0.05, "pretrained": "r"}})
    assert results.recipe_labels([scratch, older, embedded]) == [
        "pretrained.method=none", "pretrained.method=unknown", "pretrained.method=swav"]


def test_collect_results_writes_the_recipe_column_and_a_legend_line_per_recipe(tmp_path, monkeypatch):
    from clusterlab.eval import plots

    root, out = tmp_path / "runs", tmp_path / "tables"
    for seed in (0, 1):
        write_trained_run(root, f"swav_s{seed}", seed, 0.8 + seed / 10)
        write_trained_run(root, f"swav_queue_s{seed}", seed, 0.7, queue_length=3840)
    legends = {}

    def save_png(figure, path, **kwargs):
        legends[Path(path).name] = [text.get_text() for text in figure.legends[0].get_texts()]

    monkeypatch.setattr(plots, "save_png", save_png)
    entry_module("collect_results").main(["--root", str(root), "--out", str(out), "--published", "",
                                          "--curves", "false"])
    written = pd.read_csv(out / "cifar10.csv")
    assert list(written.columns[5:7]) == ["protocol", "recipe"]
    assert dict(zip(written["recipe"], written["n"])) == {"queue_length=0": 2, "queue_length=3840": 2}
    header = [cell.strip() for cell in (out / "cifar10.md").read_text().splitlines()[2].split("|")]
    assert header[6:8] == ["protocol", "recipe"]
    assert "queue\\_length=3840" in (out / "cifar10.tex").read_text()
    assert legends["cifar10_acc.png"] == ["swav cluster queue_length=0", "swav cluster queue_length=3840"]


# How scripts/*.sh built each shipped table from results/runs/<study>: (study, --out below results/, extra flags).
SHIPPED_TABLES = [("fashion_mnist", ".", ["--published", str(ROOT / "results" / "published.csv")]),
                  *((study, study, ["--published", ""]) for study in ("fashion_mnist_bf16", "fashion_mnist_crops",
                                                                      "fashion_mnist_longer", "fashion_mnist_view",
                                                                      "fashion_mnist_wider")),
                  *((study, study, ["--published", "", "--combined", "COMBINED"])
                    for study in ("small_data", "small_data_pixels"))]


@pytest.mark.parametrize("study, out, flags", SHIPPED_TABLES, ids=[study for study, *_ in SHIPPED_TABLES])
def test_the_shipped_tables_regenerate_byte_for_byte(tmp_path, study, out, flags, capsys):
    """Every study's runs are comparable (one run per recipe, or seeds of one): the tables built from its records
    today are the files in results/, with no recipe column."""
    combined = tmp_path / "combined.md"
    flags = [str(combined) if flag == "COMBINED" else flag for flag in flags]
    entry_module("collect_results").main(["--root", str(ROOT / "results" / "runs" / study), "--out",
                                          str(tmp_path / "out"), "--plots", "false", "--curves", "false", *flags])
    capsys.readouterr()
    built = sorted(path for path in (tmp_path / "out").iterdir() if path.name != ".tables_by_collect_results")
    assert built, study
    for path in built:
        assert path.read_bytes() == (ROOT / "results" / out / path.name).read_bytes(), path.name
    if "--combined" in flags:
        assert combined.read_bytes() == (ROOT / "results" / f"{study}.md").read_bytes()


@pytest.mark.filterwarnings("ignore:No artists with labels")  # errorbar is replaced by a recorder: nothing drawn
def test_plots_draw_a_line_per_backbone_and_protocol_named_in_the_legend(tmp_path, monkeypatch):
    """Two widths of one method, and kNN at two k: four lines, each named by what tells it from the others."""
    import matplotlib.axes

    drawn = []
    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar",
                        lambda self, x, y, **kw: drawn.append((kw["label"], list(x), list(y))))
    knn = {k: {"k": k, "temperature": 0.1} for k in (20, 200)}
    records = [{**record(0, epoch=epoch, eval_kind="knn", protocol=knn[k], run=backbone, top1=top1),
                "backbone": backbone}
               for backbone, epoch, k, top1 in [("w8", 100, 20, 0.5), ("w8", 200, 20, 0.6), ("w64", 100, 20, 0.7),
                                                ("w64", 200, 20, 0.8), ("w8", 100, 200, 0.4), ("w8", 200, 200, 0.45)]]
    table = results.aggregate(results.records_frame(records))
    results.plot_against_epochs(table, tmp_path, "digits")
    assert sorted((label.split(" k=")[0], label.split(" k=")[1].split()[0], y) for label, _, y in drawn) == [
        ("swav w64 knn", "20", [70.0, 80.0]), ("swav w8 knn", "20", [50.0, 60.0]), ("swav w8 knn", "200", [40.0, 45.0])]


def test_a_row_averaging_runs_that_share_a_seed_is_named_in_a_warning():
    """Two copies of one run (or two runs from different --pretrained runs, which the row does not show) would count
    as two seeds with std 0; runs of different seeds are what n and std are for, and pass silently."""
    copies = [{**record(seed, acc=0.5, run=run), "file": f"{run}/metrics.jsonl"}
              for seed, run in ((0, "a/swav"), (1, "c/swav"), (0, "b/swav"))]
    # (named: the two that share one, not every run of the row)
    with pytest.warns(UserWarning, match=r"row digits swav .* 3 runs averaged as seeds, of which 2 share a seed .*"
                                         r": a/swav \(seed 0\), b/swav \(seed 0\)$"):
        table = results.aggregate(results.records_frame(copies))
    assert list(table["n"]) == [3]
    seeds = [{**record(seed, acc=0.5, run=f"s{seed}/swav"), "file": f"s{seed}/swav/metrics.jsonl"} for seed in (0, 1)]
    # pixel baselines of two studies have no seed, so none to share (they were named as copies of one run)
    baselines = [{**record(None, method="pixels", epoch=None, acc=0.4, run=f"{study}/pixels"),
                  "file": f"{study}/pixels/metrics.jsonl"} for study in ("a", "b")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(results.aggregate(results.records_frame(seeds + baselines))["n"]) == [2, 2]


def test_runs_are_compared_by_the_precision_that_ran(tmp_path):
    """--amp auto is bf16 on a GPU and float32 on the CPU: two such runs were averaged as seeds, while an explicit
    --amp bf16 beside an auto that ran bf16 was split off."""
    root = tmp_path / "runs"
    for name, seed, acc, amp, precision in (("gpu", 1, 0.8, "auto", "bf16"), ("cpu", 2, 0.6, "auto", "float32"),
                                            ("explicit", 3, 0.7, "bf16", "bf16")):
        write_trained_run(root, name, seed, acc, amp=amp)
        config = yaml.safe_load((root / name / "config.yaml").read_text())
        (root / name / "config.yaml").write_text(yaml.safe_dump({**config, "precision": precision}))
    table = results.aggregate(results.records_frame(results.read_records(root)))
    assert rows_of(table) == {("swav", "amp=bf16"): (2, 75.0), ("swav", "amp=float32"): (1, 60.0)}


def test_a_trained_run_without_its_config_is_of_unknown_code_and_an_unreadable_one_is_named(tmp_path):
    """A missing config.yaml was not named (an unreadable one was), and its run met published numbers though
    whether it ended at that epoch cannot be told."""
    root = tmp_path / "runs"
    write_jsonl(root / "lost" / "metrics.jsonl", [{**record(run="lost", epoch=10, acc=0.5), **CLEAN}])
    write_run(root, "garbled", CLEAN, CLEAN, seed=1, epoch=20, acc=0.5)
    (root / "garbled" / "config.yaml").write_text("args: [1, 2\n")
    write_run(root, "folder", CLEAN, None, seed=2, epoch=20, acc=0.5)
    (root / "folder" / "config.yaml").mkdir()  # (it was said to be missing)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frame = results.records_frame(results.read_records(root))
    assert sorted(str(w.message) for w in caught) == [
        f"{root / name / 'config.yaml'} {why}: its run's settings and code are unknown (recipe unknown, revision "
        f"unknown, no published number)" for name, why in (("folder", "cannot be read"), ("garbled", "cannot be read"),
                                                           ("lost", "is missing"))]
    assert dict(zip(frame["run"], frame["revision"])) == {"lost": "unknown", "garbled": "unknown", "folder": "unknown"}
    assert frame["settings_unknown"].tolist() == [True, True, True]


def test_a_run_whose_settings_are_unknown_meets_no_published_number(tmp_path):
    """A run killed at epoch 200 of 400 whose config.yaml was lost: its record met the number published for 200
    epochs, though whether it ended there cannot be told; a seed beside it with its config.yaml is a row of its own,
    which meets it (the two were averaged, and that row got none)."""
    root = tmp_path / "runs"

    def trained(name, seed, acc):
        write_trained_run(root, name, seed, acc, dataset="digits")
        write_jsonl(root / name / "metrics.jsonl", [{**record(seed, run=name, acc=acc), **CLEAN}])

    trained("lost", 1, 0.9)
    (root / "lost" / "config.yaml").unlink()
    published = pd.read_csv(io.StringIO(PUBLISHED))
    with pytest.warns(UserWarning, match="lost/config.yaml is missing"):
        table = results.attach_published(results.aggregate(results.records_frame(results.read_records(root))),
                                         published)
    assert list(table["published"]) == [None] and list(table["settings_unknown"]) == [True]
    trained("known", 0, 0.8)
    with pytest.warns(UserWarning, match="lost/config.yaml is missing"):
        table = results.attach_published(results.aggregate(results.records_frame(results.read_records(root))),
                                         published)
    assert (list(table["recipe"]), list(table["n"]), list(table["published"])) == (
        ["", results.UNKNOWN_RECIPE], [1, 1], [80.5, None])
    (root / "lost").rename(tmp_path / "elsewhere")
    table = results.attach_published(results.aggregate(results.records_frame(results.read_records(root))),
                                     published)
    assert list(table["published"]) == [80.5] and "settings_unknown" not in table


def test_a_metric_that_is_no_number_is_left_out_and_a_row_missing_it_for_some_runs_says_so(tmp_path):
    """A JSON true counted as 100 %, an ACC of 1.5 (a percentage written by hand, or a fraction over 1) as 150, and a
    metric one seed's record lacks was averaged over the others while n counted them all, without a word."""
    root = tmp_path / "runs"
    write_run(root, "s0", CLEAN, CLEAN, seed=0, epoch=10, acc=0.5, nmi=0.4, ari=-0.1)
    write_run(root, "s1", CLEAN, CLEAN, seed=1, epoch=10, acc=True, ari=-1.5, ami=0.2)
    write_run(root, "s2", CLEAN, CLEAN, seed=2, epoch=10, acc=float("nan"), nmi=float("inf"))
    write_run(root, "s3", CLEAN, CLEAN, seed=3, epoch=10, acc=1.5, nmi=-0.01, ami=0.2)
    with pytest.warns(UserWarning) as caught:
        frame = results.records_frame(results.read_records(root))
    said = [str(warning.message) for warning in caught]
    for run, metric, value, valid in (("s1", "acc", "True", "[0, 1]"), ("s2", "acc", "nan", "[0, 1]"),
                                      ("s2", "nmi", "inf", "[0, 1]"), ("s3", "acc", "1.5", "[0, 1]"),
                                      ("s3", "nmi", "-0.01", "[0, 1]"), ("s1", "ari", "-1.5", "[-1, 1]")):
        assert any(f"{run}/metrics.jsonl: the {metric} of checkpoint.pth at epoch 10 is {value}, not a fraction in "
                   f"{valid}: left out" in line for line in said), (run, metric, said)
    assert len(said) == 6  # s0's ARI below chance is one
    with pytest.warns(UserWarning) as caught:
        table = results.aggregate(frame)
    said = [str(warning.message) for warning in caught]
    # s2's record, every number of it left out, is no run of the row (it counted in n, and alone it made a row)
    assert "s2" not in set(frame["run"])
    assert any("its acc averages 1 of its 3 runs" in line for line in said)
    assert any("its nmi averages 1 of its 3 runs" in line for line in said)
    assert (table["n"].tolist(), table["acc_mean"].tolist(), table["nmi_mean"].tolist(),
            table["ari_mean"].tolist()) == ([3], [50.0], [40.0], [-10.0])


def test_each_checkpoint_of_a_run_extended_on_resume_is_filed_under_the_schedule_it_trained_with(tmp_path):
    """Seed 1 trained 2 epochs (evaluated), then was extended to 3 (--epochs changes on resume): its epoch-2 record
    was filed under epochs=3 as a mid-run checkpoint, apart from seed 0, and its epoch-3 record averaged with a run
    trained 3 epochs from the start, which never climbed back from a finished schedule."""
    root = tmp_path / "runs"
    extension = {"epoch": 2, "step": 0, "before": {"epochs": 2}, "after": {"epochs": 3}}
    for name, seed, epochs, changes in (("s0", 0, 2, []), ("s1", 1, 3, [extension]), ("long", 2, 3, [])):
        write_trained_run(root, name, seed, 0.0, epochs=epochs)
        config = yaml.safe_load((root / name / "config.yaml").read_text())
        (root / name / "config.yaml").write_text(yaml.safe_dump({**config, "resume_changes": changes}))
    write_jsonl(root / "s1" / "metrics.jsonl", [
        {**record(1, dataset="cifar10", epoch=2, run="s1", acc=0.60), **CLEAN},
        {**record(1, dataset="cifar10", epoch=3, run="s1", acc=0.70), **CLEAN}])
    write_jsonl(root / "s0" / "metrics.jsonl", [{**record(0, dataset="cifar10", epoch=2, run="s0", acc=0.50),
                                                 **CLEAN}])
    write_jsonl(root / "long" / "metrics.jsonl", [{**record(2, dataset="cifar10", epoch=3, run="long", acc=0.80),
                                                   **CLEAN}])
    table = results.aggregate(results.records_frame(results.read_records(root)))
    rows = {(row["epoch"], row["recipe"]): (row["n"], round(row["acc_mean"], 6)) for _, row in table.iterrows()}
    assert rows == {(2, ""): (2, 55.0), (3, "resume_changes=epochs 2->3 at the end of epoch 2"): (1, 70.0),
                    (3, "resume_changes=none"): (1, 80.0)}
    assert "mid_run" not in table


def test_resume_changes_not_written_by_the_engine_are_passed_over():
    settings = {"epochs": 3, "lr": 0.6}
    edited = [{"epoch": None, "step": 0, "before": {"epochs": 2}, "after": {"epochs": 3}},
              {"epoch": "2", "step": 0, "before": {"epochs": 2}, "after": {"epochs": 3}}, "epochs 2->3", None]
    assert results.settings_at(settings, edited, (3, 0)) == {**settings, "resume_changes": "none"}
    assert results.settings_at(settings, None, (3, 0)) == settings  # config.yaml of a run before the key


def test_a_precision_changed_on_resume_files_each_checkpoint_under_the_precision_it_trained_in():
    settings = {"amp": "fp16", "epochs": 3}  # config.yaml of the last start: --amp auto resumed on a V100
    changes = [{"epoch": 2, "step": 0, "before": {"amp": "bf16"}, "after": {"amp": "fp16"}}]
    assert results.settings_at(settings, changes, (2, 0)) == {"amp": "bf16", "epochs": 3, "resume_changes": "none"}
    assert results.settings_at(settings, changes, (3, 0)) == {**settings,
                                                              "resume_changes": "amp bf16->fp16 at the end of epoch 2"}




def stage_two(tmp_path: Path, amp: str, precision: str) -> dict:
    """config.yaml of a scan run whose --pretrained SwAV run had `--amp amp` and ran in `precision`."""
    first = {"method": "swav", "epoch": 50, "step": 0, "precision": precision,
             "args": {"method": "swav", "lr": 0.6, "amp": amp, "seed": 0}}
    origin = pretrained_origin(tmp_path / "swav" / "checkpoint.pth", first)
    return {"args": {"method": "scan", "lr": 1e-4, "amp": "off", "seed": 1, "pretrained": "runs/swav"},
            "precision": "float32", "pretrained_from": origin}


def test_first_stages_of_one_precision_are_one_recipe(tmp_path):
    # --amp off and --amp auto both ran float32 on the CPU: the same first stage, as for the run's own --amp
    assert results.run_settings(stage_two(tmp_path, "off", "float32")) == \
        results.run_settings(stage_two(tmp_path, "auto", "float32"))


def test_first_stages_of_other_precisions_are_other_recipes(tmp_path):
    # --amp auto ran bf16 on an Ampere card and float32 on the CPU: different first stages
    assert results.run_settings(stage_two(tmp_path, "auto", "bf16")) != \
        results.run_settings(stage_two(tmp_path, "auto", "float32"))


def test_a_first_stages_training_set_and_mined_view_come_from_its_checkpoint(tmp_path):
    """pretrained_origin records what run_settings compares: the images the first stage trained on (the checkpoint's
    data_info) and, for a SCAN run, the view it mined on (its method_state). config.yaml's pretrained_from had
    neither, so self-labelling runs on SCAN runs mined at 20 and at 28 px were averaged as seeds of one row."""
    def selflabel(mined: int, images: int) -> dict:
        scan_state = {"method": "scan", "epoch": 4, "step": 0, "precision": "float32",
                      "args": {"method": "scan", "mining_crop": 0, "seed": 0},
                      "data_info": {"num_samples": images, "fingerprint": f"digest{images}"},
                      "method_state": {"mining_view": [mined, mined], "pretrained_from": None}}
        origin = pretrained_origin(tmp_path / "scan" / "checkpoint.pth", scan_state)
        return {"args": {"method": "scan_selflabel", "seed": 1, "pretrained": "runs/scan"}, "precision": "float32",
                "pretrained_from": origin}
    origin = selflabel(20, 4000)["pretrained_from"]
    assert origin["training_set"] == {"images": 4000, "fingerprint": "digest4000"}
    assert origin["neighbours_mined_on"] == {"crop": 20, "resize": 20}
    settings = results.run_settings(selflabel(20, 4000))
    assert (settings["pretrained.neighbours_mined_on"], settings["pretrained.training_set.images"]) == (20, 4000)
    assert settings != results.run_settings(selflabel(28, 4000))
    assert settings != results.run_settings(selflabel(20, 60000))
    # a scan checkpoint written before it kept the view of a --mining_crop: that crop
    older = {"method": "scan", "args": {"method": "scan", "mining_crop": 28}, "method_state": {"mining_view": None}}
    assert pretrained_origin(tmp_path / "scan" / "checkpoint.pth", older)["neighbours_mined_on"] == {"crop": 28,
                                                                                                    "resize": 28}
    # an embedding run's checkpoint names no mined view
    assert "neighbours_mined_on" not in pretrained_origin(tmp_path / "swav" / "checkpoint.pth",
                                                          {"method": "swav", "data_info": {"num_samples": 10}})


@pytest.mark.filterwarnings("ignore:No artists with labels")
def test_plot_lines_follow_the_runs_recipe_not_the_rows_recipe_column(tmp_path, monkeypatch):
    """Runs a and b (epochs=3) at epochs 1 and 3, run c (epochs=200) at epochs 1 and 28: the epoch-1 row is split by
    recipe, the others are not. Each recipe is one line: a and b's epochs 1 and 3, c's epochs 1 and 28."""
    import matplotlib.axes

    drawn = []
    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar",
                        lambda self, x, y, **kw: drawn.append((kw["label"], list(x), list(y))))
    root = tmp_path / "runs"
    for name, seed, epochs, points in (("a", 0, 3, [(1, 0.40), (3, 0.50)]), ("b", 1, 3, [(1, 0.40), (3, 0.50)]),
                                       ("c", 0, 200, [(1, 0.10), (28, 0.20)])):
        write_jsonl(root / name / "metrics.jsonl",
                    [{**record(seed, dataset="cifar10", epoch=epoch, run=name, acc=acc), **CLEAN}
                     for epoch, acc in points])
        config = {"program": "main_pretrain.py", "args": {**SWAV_ARGS, "seed": seed, "epochs": epochs}, **CLEAN}
        (root / name / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    table = results.aggregate(results.records_frame(results.read_records(root)))
    results.plot_against_epochs(table, tmp_path, "cifar10")
    assert sorted((x, y) for _, x, y in drawn) == [([1, 3], [40.0, 50.0]), ([1, 28], [10.0, 20.0])]
    assert sorted(label for label, _, _ in drawn) == ["swav cluster epochs=200", "swav cluster epochs=3"]


@pytest.mark.filterwarnings("ignore:No artists with labels")
def test_plot_legend_names_only_the_protocol_parts_that_differ(tmp_path, monkeypatch):
    """Image-folder records (README: `eval_knn.py --k 20 200` on two folders): each line's label was the whole
    protocol, some 170 characters, and the legend squeezed the axes off the figure."""
    import matplotlib.axes

    drawn = []
    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar",
                        lambda self, x, y, **kw: drawn.append(kw["label"]))
    protocol = {"temperature": 0.1, "features": "backbone", "train_features": "recomputed", "fit_on": "train",
                "selection": "last", "top5": "voted", "scored_images": 10000, "eval_resize": 20, "eval_crop": 20}
    records = [{**record(0, epoch=120, eval_kind="knn", run=f"{data}_{k}", top1=0.8),
                "protocol": {**protocol, "k": k, "data": data, "train_images": size}}
               for data, size in (("fm_4000", 4000), ("fm_8000", 8000)) for k in (20, 200)]
    table = results.aggregate(results.records_frame(records))
    results.plot_against_epochs(table, tmp_path, "imagefolder")
    assert sorted(drawn) == ["swav knn data=fm_4000 k=20 train_images=4000",
                             "swav knn data=fm_4000 k=200 train_images=4000",
                             "swav knn data=fm_8000 k=20 train_images=8000",
                             "swav knn data=fm_8000 k=200 train_images=8000"]


@pytest.mark.parametrize("older, newer", [
    ({}, {"args": {"new_flag": 1}}),  # a run trained before a flag existed
    ({"resume_changes": [{"epoch": 4, "step": 0, "before": {"world_size": 2}, "after": {"world_size": 1}}]}, {}),
], ids=["flag-added-since", "world-size-before-a-resume"])
@pytest.mark.filterwarnings("ignore:No artists with labels")
def test_runs_the_tables_take_for_one_recipe_are_one_line(tmp_path, monkeypatch, older, newer):
    """The tables compare only the flags every run records (a flag a run lacks is no evidence of another recipe);
    the plot compared whole settings and drew such runs as two lines of one label."""
    import matplotlib.axes

    drawn = []
    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", lambda self, x, y, **kw: drawn.append(list(x)))
    root = tmp_path / "runs"
    for name, seed, epochs, extra in (("a", 0, (1, 3), older), ("b", 1, (1, 3, 5), newer)):
        write_jsonl(root / name / "metrics.jsonl",
                    [{**record(seed, dataset="cifar10", epoch=epoch, run=name, acc=0.5), **CLEAN} for epoch in epochs])
        config = {"program": "main_pretrain.py", "args": {**SWAV_ARGS, "seed": seed, **extra.get("args", {})},
                  **CLEAN, **{k: v for k, v in extra.items() if k != "args"}}
        (root / name / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    table = results.aggregate(results.records_frame(results.read_records(root)))
    assert "recipe" not in table
    results.plot_against_epochs(table, tmp_path, "cifar10")
    assert drawn == [[1, 3, 5]]


def test_a_stage_two_on_an_extended_first_stage_is_no_seed_of_one_on_a_first_stage_trained_that_long(tmp_path):
    """SwAV trained 3 epochs, and SwAV trained 2 then resumed with --epochs 3, both end at epoch 3 with args
    epochs=3; the second's checkpoint keeps resume_changes. SCAN started from each must be two recipes, as the
    two SwAV runs' own checkpoints are."""
    def first(changes):
        return {"method": "swav", "epoch": 3, "step": 0, "precision": "float32", "resume_changes": changes,
                "args": {"method": "swav", "lr": 0.6, "epochs": 3, "seed": 0}}

    extended = [{"epoch": 2, "step": 0, "before": {"epochs": 2}, "after": {"epochs": 3}}]
    settings = [results.run_settings({"args": {"method": "scan", "lr": 1e-4, "seed": seed, "pretrained": "p"},
                                      "pretrained_from": pretrained_origin(tmp_path / "checkpoint.pth", first(c))})
                for seed, c in ((0, []), (1, extended))]
    assert results.recipe_labels(settings) == [
        "pretrained.resume_changes=none", "pretrained.resume_changes=epochs 2->3 at the end of epoch 2"]


@pytest.mark.filterwarnings("ignore:No artists with labels")
def test_runs_that_record_a_flag_others_lack_are_two_recipes_where_they_disagree_on_it(tmp_path, monkeypatch):
    """b and c record a flag a lacks, with different values: b and c are no seeds of one recipe (they were averaged,
    and drawn as one line with two points at epoch 5); a, which does not say, is a recipe of its own."""
    import matplotlib.axes

    drawn = []
    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", lambda self, x, y, **kw: drawn.append((list(x), list(y))))
    root = tmp_path / "runs"
    for name, seed, epochs, flag, acc in (("a", 0, (1, 3), {}, 0.5), ("b", 1, (1, 3, 5), {"new_flag": 1}, 0.6),
                                          ("c", 2, (1, 3, 5), {"new_flag": 2}, 0.9)):
        write_jsonl(root / name / "metrics.jsonl",
                    [{**record(seed, dataset="cifar10", epoch=epoch, run=name, acc=acc), **CLEAN} for epoch in epochs])
        config = {"program": "main_pretrain.py", "args": {**SWAV_ARGS, "seed": seed, **flag}, **CLEAN}
        (root / name / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    table = results.aggregate(results.records_frame(results.read_records(root)))
    assert sorted(zip(table["epoch"], table["recipe"], table["n"])) == [
        (1, "new_flag=1", 1), (1, "new_flag=2", 1), (1, "new_flag=unrecorded", 1), (3, "new_flag=1", 1),
        (3, "new_flag=2", 1), (3, "new_flag=unrecorded", 1), (5, "new_flag=1", 1), (5, "new_flag=2", 1)]
    results.plot_against_epochs(table, tmp_path, "cifar10")
    assert sorted(drawn) == [([1, 3], [50.0, 50.0]), ([1, 3, 5], [60.0, 60.0, 60.0]), ([1, 3, 5], [90.0, 90.0, 90.0])]


def test_a_legend_of_long_recipe_labels_stays_inside_the_plot(tmp_path, monkeypatch):
    """Labels of several differing flags were wider than the figure: the legend, centred below the axes, lost the
    first and last letters of every line (`pid knn ...`)."""
    import clusterlab.eval.plots as plots

    root = tmp_path / "runs"
    for number in range(6):
        name = f"swav_{number}"
        write_jsonl(root / name / "metrics.jsonl", [{**record(0, dataset="cifar10", epoch=epoch, run=name,
                                                              acc=0.5 + 0.01 * number), **CLEAN} for epoch in (1, 2)])
        flags = {"freeze_prototypes_epochs": number, "epoch_queue_starts": 10 + number,
                 "min_scale_crops": [0.14 + number / 100, 0.05], "max_scale_crops": [1.0, 0.14 + number / 100]}
        config = {"program": "main_pretrain.py", "args": {**SWAV_ARGS, "seed": 0, **flags}, **CLEAN}
        (root / name / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    table = results.aggregate(results.records_frame(results.read_records(root)))
    assert min(len(label) for label in table["recipe"]) > results.LEGEND_LINE_CHARACTERS
    outside = []

    def measure(figure, path, dpi):
        figure.canvas.draw()
        box, page = figure.legends[0].get_window_extent(), figure.bbox
        outside.append((box.x0 < page.x0 or box.x1 > page.x1 or box.y0 < page.y0, box.x0, box.x1, page.x1))

    monkeypatch.setattr(plots, "save_png", measure)
    results.plot_against_epochs(table, tmp_path, "cifar10")
    assert outside and not any(out for out, *_ in outside), outside


def test_tables_replace_a_link_in_their_place_and_plots_of_metrics_gone_are_removed(tmp_path):
    """A table was written through a link in --out (a file of one's own behind it replaced by LaTeX), in place (a
    full disk left it cut short); the plot of a metric that no record has any more stayed beside the new ones."""
    root, out = tmp_path / "runs", tmp_path / "tables"
    cluster = [record(seed, epoch=epoch, acc=0.5 + 0.1 * seed) for seed in (0, 1) for epoch in (100, 200)]
    knn = [record(seed, epoch=epoch, eval_kind="knn", protocol={"k": 20, "temperature": 0.1}, top1=0.6)
           for seed in (0, 1) for epoch in (100, 200)]
    write_jsonl(root / "swav" / "metrics.jsonl", [*cluster, *knn])
    collect = ["--root", root, "--out", out, "--published", "", "--curves", "false"]
    entry_module("collect_results").main([str(a) for a in collect])
    plots = sorted(p.name for p in out.glob("digits_*.png"))
    assert "digits_acc.png" in plots and "digits_top1.png" in plots
    own = tmp_path / "precious.txt"
    own.write_text("mine\n")
    (out / "digits.tex").unlink()
    (out / "digits.tex").symlink_to(own)
    write_jsonl(root / "swav" / "metrics.jsonl", knn)
    entry_module("collect_results").main([str(a) for a in collect])
    assert own.read_text() == "mine\n"
    assert not (out / "digits.tex").is_symlink() and "\\begin{tabular}" in (out / "digits.tex").read_text()
    left = sorted(p.name for p in out.glob("digits_*.png"))
    assert "digits_top1.png" in left and "digits_acc.png" not in left and set(left) < set(plots)
    assert not list(out.glob(".*.tmp"))


def test_tables_of_a_dataset_no_run_is_of_any_more_are_removed_and_nothing_else(tmp_path, capsys):
    """The tables and plots of a dataset whose runs were removed from ROOT stayed in --out beside the new ones, as if
    still true; files the collection did not write there (one's own notes, another dataset's tables a hand copied in,
    a link) stay."""
    root, out = tmp_path / "runs", tmp_path / "tables"
    write_jsonl(root / "swav" / "metrics.jsonl", [record(0, epoch=100, acc=0.5)])
    write_jsonl(root / "gone" / "metrics.jsonl", [record(0, dataset="cifar10", epoch=100, acc=0.6)])
    collect = [str(a) for a in ("--root", root, "--out", out, "--published", "", "--curves", "false")]
    entry_module("collect_results").main(collect)
    written = sorted(p.name for p in out.glob("cifar10*"))
    assert {"cifar10.csv", "cifar10.md", "cifar10.tex", "cifar10_acc.png"} <= set(written)
    (out / "notes.md").write_text("mine\n")
    (out / "stl10.md").write_text("a table copied in by hand\n")
    (tmp_path / "precious.png").write_bytes(b"png")
    (out / "cifar10_acc.png").unlink()
    (out / "cifar10_acc.png").symlink_to(tmp_path / "precious.png")
    shutil.rmtree(root / "gone")
    capsys.readouterr()
    entry_module("collect_results").main(collect)
    assert sorted(p.name for p in out.glob("cifar10*")) == ["cifar10_acc.png"]  # (the link, not the collection's)
    assert (tmp_path / "precious.png").read_bytes() == b"png"
    assert (out / "notes.md").read_text() == "mine\n" and (out / "stl10.md").exists() and (out / "digits.md").exists()
    assert f"the tables of cifar10 removed from {out}/" in capsys.readouterr().out
    assert json.loads((out / ".tables_by_collect_results").read_text()) == ["digits"]


def test_runs_of_one_name_in_two_folders_are_told_apart_and_a_mid_run_epoch_is_marked(tmp_path):
    """Warnings and the revision footnote named runs by their folder's last part (x/swav1 and y/swav1 were 'swav1');
    a checkpoint in the middle of a longer run showed in the Markdown table as a finished run's result."""
    root = tmp_path / "runs"
    for folder in ("x", "y"):
        write_jsonl(root / folder / "swav1" / "metrics.jsonl", [record(0, run="swav1", acc=0.5)])
    for folder, state in (("x", DIRTY), ("y", CLEAN)):
        (root / folder / "swav1" / "config.yaml").write_text(
            yaml.safe_dump({"program": "main_pretrain.py", "args": {"epochs": 800}, **state}))
    frame = results.records_frame(results.read_records(root))
    with pytest.warns(UserWarning, match=r"2 share a seed .*: x/swav1 \(seed 0\), y/swav1 \(seed 0\)$"):
        table = results.aggregate(frame)
    assert results.revision_footnote(frame).endswith(": x/swav1.")
    shown = results.display_table(table)
    assert list(shown["epoch"]) == ["200 (mid-run)"]


def test_a_flag_the_runs_optimiser_and_schedule_do_not_read_splits_no_recipe():
    """Two seeds of one recipe, one recorded with --start_warmup 0.0 (a config that gave it without a warm-up), the
    other with the method's 0.3: one row of n=2, not two recipes."""
    def config(start_warmup):
        return {"args": {"method": "selfclassifier", "optimizer": "sgd", "schedule": "cosine", "lr_drops": [],
                         "warmup_epochs": 0, "start_warmup": start_warmup, "weight_decay": 1e-4, "lr": 0.1,
                         "lars_exclude_bias_norm": False}}
    def settings(run_config, position=(10, 0)):
        return results.without_unread(results.settings_at(results.run_settings(run_config),
                                                          run_config.get("resume_changes"), position))
    assert settings(config(0.0)) == settings(config(0.3))
    assert settings(config(0.0))["lr"] == 0.1 and "start_warmup" not in settings(config(0.0))
    warm = {"args": {**config(0.0)["args"], "warmup_epochs": 1}}
    assert settings(warm)["start_warmup"] == 0.0
    # which flags go unread is decided at the position: a run resumed from a cosine schedule onto a step one read
    # its final_lr before the change (dropped, two runs of other final_lr values were averaged as seeds)
    resumed = {"args": {**config(0.0)["args"], "schedule": "step", "final_lr": 0.001},
               "resume_changes": [{"epoch": 10, "step": 0, "before": {"schedule": "cosine"},
                                   "after": {"schedule": "step"}}]}
    assert settings(resumed, (5, 0))["final_lr"] == 0.001 and "final_lr" not in settings(resumed, (12, 0))
