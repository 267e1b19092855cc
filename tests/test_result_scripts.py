"""The result scripts' bookkeeping (scripts/fashion_mnist.sh, fashion_mnist_longer.sh, fashion_mnist_wider.sh,
fashion_mnist_bf16.sh, fashion_mnist_crops.sh, fashion_mnist_view.sh, small_data.sh, small_data_pixels.sh), with a
stand-in for Python (the real runs take hours):
each keeps in results/runs/ exactly the files the repository's copy holds, plus provenance.json naming the commit,
builds its tables from that copy, and refuses a tree with uncommitted changes (unless FORCE=1) and an OUT that already
holds runs. And scripts/fashion_mnist_tries.sh's choice of tries, with the same stand-in, and
scripts/small_data_tries.sh's refusal of an OUT that holds runs."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT

# Python's stand-in: training writes a run directory with a checkpoint, an evaluation appends a record to its run
# (or a baseline's --output_dir; eval_knn.py one per --k value), collect_results.py notes its arguments and writes
# a table.
FAKE_PYTHON = r"""#!/bin/bash
program=$1; shift
# ARGS_LOG: every argument received, one per line, in one write (a printf of many arguments wrote them in pieces,
# which the two queues of a script interleaved)
[ -z "${ARGS_LOG:-}" ] || { received=$(printf '%s\n' "$@"); printf '%s\n' "$received" >> "$ARGS_LOG"; }
value() { local key=$1; shift; while [ $# -gt 0 ]; do [ "$1" = "$key" ] && { echo "$2"; return; }; shift; done; }
# FAIL=PROGRAM:TEXT: that program fails where its arguments hold TEXT
if [ -n "${FAIL:-}" ] && [ "$program" = "${FAIL%%:*}" ] && [[ " $* " == *"${FAIL#*:}"* ]]; then
  echo "failing on purpose: $program $*" >&2; exit 3
fi
case $program in
  main_pretrain.py|main_cluster.py)
    sleep "${TRAIN_SECONDS:-0}"
    run=$(value --output_dir "$@"); mkdir -p "$run"
    echo "args: {}" > "$run/config.yaml"; echo '{"epoch": 0}' > "$run/train_log.jsonl"; touch "$run/checkpoint.pth"
    echo "trained $run" ;;
  eval_*.py)  # one record, or one per value of eval_knn.py's --k
    run=$(value --run "$@"); run=${run:-$(value --output_dir "$@")}; mkdir -p "$run"
    records=0; in_k=0
    for arg in "$@"; do
      case $arg in --k) in_k=1 ;; --*) in_k=0 ;; *) records=$((records + in_k)) ;; esac
    done
    for _ in $(seq "$((records > 0 ? records : 1))"); do
      echo "{\"program\": \"$program\"}" >> "$run/metrics.jsonl"
    done
    echo "evaluated $run" ;;
  collect_results.py)  # a table naming the root and the hidden list of the tables, in --out, and the --combined file
    echo "$*" > collect_results.args
    out=$(value --out "$@"); mkdir -p "$out"; echo "tables of $(value --root "$@")" > "$out/table.md"
    echo '["table"]' > "$out/.tables_by_collect_results"
    combined=$(value --combined "$@"); [ -z "$combined" ] || echo "all tables" > "$combined" ;;
esac
"""


# the last is called by the first
SCRIPTS = ("fashion_mnist.sh", "fashion_mnist_longer.sh", "fashion_mnist_wider.sh", "fashion_mnist_bf16.sh",
           "fashion_mnist_crops.sh", "fashion_mnist_view.sh", "small_data.sh", "small_data_pixels.sh",
           "scan_fashion_mnist.sh")
# small_data.sh's runs and pixel baselines
RUNS = [f"{method}_{data}" for data in ("fm_4000", "fm_8000", "digits") for method in ("swav", "unmix")]
PIXELS = [f"pixels_{data}" for data in ("fm_4000", "fm_8000", "digits")]


def scratch_repo(tmp_path: Path) -> Path:
    """A committed checkout holding the scripts, and the stand-in Python beside it."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    for script in SCRIPTS:
        shutil.copy(ROOT / "scripts" / script, repo / "scripts")
    shutil.copytree(ROOT / "scripts" / "lib", repo / "scripts" / "lib")
    (repo / ".gitignore").write_text("/runs/\n")
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "scratch")
    return repo


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          capture_output=True, text=True, check=True).stdout.strip()


def run_script(repo: Path, script: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(repo / "scripts" / script)], capture_output=True, text=True,
                          env={**os.environ, "PY": str(repo.parent / "python"), **env}, timeout=120)


def files_below(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()}


def run_and_keep(tmp_path: Path, script: str, study: str) -> tuple[Path, Path]:
    """Run `script` in a scratch checkout; it must succeed and name the clean commit. The checkout and the folder
    results/runs/<study>/ it kept."""
    scratch = scratch_repo(tmp_path)
    done = run_script(scratch, script)
    assert done.returncode == 0, done.stderr
    kept = scratch / "results" / "runs" / study
    provenance = json.loads((kept / "provenance.json").read_text())
    assert (provenance["git_commit"], provenance["git_dirty"]) == (git(scratch, "rev-parse", "HEAD"), False)
    # the staged records and tables took their places (the tables were built from the staged copy)
    assert not list((scratch / "results").rglob("*partial*")), list((scratch / "results").rglob("*partial*"))
    return scratch, kept


def assert_evaluated_three_times(kept: Path, folders) -> None:
    """kNN at k=20 and k=200, then k-means: three records in each folder's metrics.jsonl."""
    for folder in folders:
        assert len((kept / folder / "metrics.jsonl").read_text().splitlines()) == 3, folder


def test_fashion_mnist_keeps_exactly_what_results_runs_holds_and_names_the_commit(tmp_path):
    scratch, kept = run_and_keep(tmp_path, "fashion_mnist.sh", "fashion_mnist")
    assert files_below(kept) == files_below(ROOT / "results" / "runs" / "fashion_mnist") | {"provenance.json"}
    assert (kept / "swav" / "output.log").read_text().splitlines()[:2] == ["trained runs/fashion_mnist/swav",
                                                                          "evaluated runs/fashion_mnist/swav"]
    # the training's wall time as the script measured it ($OUT/swav.time), not the evaluations' nor another run's
    assert (kept / "swav" / "train_wall_seconds").read_bytes() == (scratch / "runs" / "fashion_mnist" /
                                                                   "swav.time").read_bytes()
    assert not list(kept.rglob("*.pth"))  # checkpoints stay in OUT
    assert (scratch / "collect_results.args").read_text().split() == [
        "--root", "runs/fashion_mnist/kept.partial", "--out", "runs/fashion_mnist/tables.partial"]
    assert (scratch / "results" / "table.md").read_text() == "tables of runs/fashion_mnist/kept.partial\n"
    # the staged folder's list of its tables is no list of results/ (left behind, it stopped the script before the
    # records moved: rmdir of a folder not empty)
    assert not (scratch / "results" / ".tables_by_collect_results").exists()


@pytest.mark.parametrize("script, study, runs", [
    ("fashion_mnist_longer.sh", "fashion_mnist_longer", ("unmix", "npid")),
    ("fashion_mnist_wider.sh", "fashion_mnist_wider", ("unmix_w12", "swav_multicrop")),
    ("fashion_mnist_bf16.sh", "fashion_mnist_bf16", ("unmix_w16",)),
    ("fashion_mnist_crops.sh", "fashion_mnist_crops", ("unmix_w16_gentle",)),
])
def test_study_keeps_exactly_what_results_runs_holds_and_builds_its_own_tables(tmp_path, script, study, runs):
    scratch, kept = run_and_keep(tmp_path, script, study)
    expected = {f"{run}/{name}" for run in runs for name in ("config.yaml", "train_log.jsonl", "metrics.jsonl",
                                                            "output.log", "train_wall_seconds")}
    assert files_below(kept) == expected | {"pixels/metrics.jsonl", "pixels/output.log", "provenance.json"}
    assert files_below(kept) == files_below(ROOT / "results" / "runs" / study) | {"provenance.json"}
    assert_evaluated_three_times(kept, (*runs, "pixels"))
    assert not list(kept.rglob("*.pth"))
    args = (scratch / "collect_results.args").read_text().split()
    assert args == ["--root", f"runs/{study}/kept.partial", "--out", f"runs/{study}/tables.partial/{study}",
                    "--published"]  # the stand-in's $* drops the empty value
    assert files_below(scratch / "results" / study) == {"table.md", ".tables_by_collect_results"}


def test_view_study_scores_every_run_and_pixels_on_both_views(tmp_path):
    """Each run on its 20 px test view and on the images' 28 px, pixels on 28 px and on 20 px: kNN at k=200 and k=20
    and k-means for each view, six records in each folder."""
    scratch = scratch_repo(tmp_path)
    done = run_script(scratch, "fashion_mnist_view.sh", ARGS_LOG=str(tmp_path / "args"))
    assert done.returncode == 0, done.stderr
    kept = scratch / "results" / "runs" / "fashion_mnist_view"
    expected = {f"{run}/{name}" for run in ("swav", "unmix") for name in ("config.yaml", "train_log.jsonl",
                                                                         "metrics.jsonl", "output.log",
                                                                         "train_wall_seconds")}
    assert files_below(kept) == expected | {"pixels/metrics.jsonl", "pixels/output.log", "provenance.json"}
    assert files_below(kept) == files_below(ROOT / "results" / "runs" / "fashion_mnist_view") | {"provenance.json"}
    for folder in ("swav", "unmix", "pixels"):
        assert len((kept / folder / "metrics.jsonl").read_text().splitlines()) == 6, folder
    args = (tmp_path / "args").read_text().splitlines()  # the two queues' arguments, in any order
    assert sorted(args[i + 1] for i, arg in enumerate(args) if arg == "--eval_crop") == ["20"] * 2 + ["28"] * 4


def test_small_data_keeps_every_run_and_baseline_and_builds_one_study_table(tmp_path):
    scratch, kept = run_and_keep(tmp_path, "small_data.sh", "small_data")
    expected = {f"{run}/{name}" for run in RUNS for name in ("config.yaml", "train_log.jsonl", "metrics.jsonl",
                                                            "output.log", "train_wall_seconds")}
    expected |= {f"{pixels}/{name}" for pixels in PIXELS for name in ("metrics.jsonl", "output.log")}
    assert files_below(kept) == expected | {"provenance.json"}
    assert_evaluated_three_times(kept, RUNS + PIXELS)
    assert (kept / "swav_fm_4000" / "output.log").read_text().splitlines()[0] == "trained runs/small_data/swav_fm_4000"
    args = (scratch / "collect_results.args").read_text().split()
    assert args == ["--root", "runs/small_data/kept.partial", "--out", "runs/small_data/tables.partial/small_data",
                    "--combined", "runs/small_data/tables.partial/small_data.md",
                    "--published"]  # the stand-in's $* drops the empty value
    assert files_below(scratch / "results" / "small_data") == {"table.md", ".tables_by_collect_results"}
    assert (scratch / "results" / "small_data.md").read_text() == "all tables\n"


def test_small_data_pixels_scores_each_baseline_on_both_views_and_builds_one_study_table(tmp_path):
    """Pixels of the two exported folders and of digits, each on the images' own size and on 20 px: kNN at k=20 and
    k=200 and k-means for each view, six records a folder; nothing trained."""
    scratch = scratch_repo(tmp_path)
    done = run_script(scratch, "small_data_pixels.sh", ARGS_LOG=str(tmp_path / "args"))
    assert done.returncode == 0, done.stderr
    kept = scratch / "results" / "runs" / "small_data_pixels"
    assert files_below(kept) == {f"{pixels}/{name}" for pixels in PIXELS for name in ("metrics.jsonl", "output.log")
                                 } | {"provenance.json"}
    assert files_below(kept) == files_below(ROOT / "results" / "runs" / "small_data_pixels") | {"provenance.json"}
    for pixels in PIXELS:
        assert len((kept / pixels / "metrics.jsonl").read_text().splitlines()) == 6, pixels
    assert not list((scratch / "runs").rglob("checkpoint.pth"))  # the stand-in's training writes one
    assert (tmp_path / "args").read_text().splitlines().count("--eval_crop") == 6
    assert (scratch / "collect_results.args").read_text().split() == [
        "--root", "runs/small_data_pixels/kept.partial", "--out",
        "runs/small_data_pixels/tables.partial/small_data_pixels", "--combined",
        "runs/small_data_pixels/tables.partial/small_data_pixels.md", "--published"]
    assert (scratch / "results" / "small_data_pixels.md").read_text() == "all tables\n"


@pytest.mark.parametrize("script, study, tables", [
    ("fashion_mnist.sh", "fashion_mnist", "table.md"), ("fashion_mnist_bf16.sh", "fashion_mnist_bf16",
                                                         "fashion_mnist_bf16"),
    ("small_data.sh", "small_data", "small_data")])
def test_a_failed_collect_leaves_the_kept_records_and_tables_as_they_were(tmp_path, script, study, tables):
    """The records and tables of a second run of the script replace the first's only once all are written."""
    scratch, kept = run_and_keep(tmp_path, script, study)
    before = {path: path.read_bytes() for path in (scratch / "results").rglob("*") if path.is_file()}
    assert (scratch / "results" / tables).exists()
    again = run_script(scratch, script, OUT="runs/again", FAIL="collect_results.py:--root")
    assert again.returncode != 0
    assert {path: path.read_bytes() for path in (scratch / "results").rglob("*") if path.is_file()
            and "partial" not in str(path.relative_to(scratch))} == before


# script, its default OUT below runs/, and a run it makes there
REFUSING = [("fashion_mnist.sh", "fashion_mnist", "swav"), ("fashion_mnist_longer.sh", "fashion_mnist_longer", "npid"),
            ("fashion_mnist_wider.sh", "fashion_mnist_wider", "unmix_w12"),
            ("fashion_mnist_bf16.sh", "fashion_mnist_bf16", "unmix_w16"),
            ("fashion_mnist_crops.sh", "fashion_mnist_crops", "unmix_w16_gentle"),
            ("fashion_mnist_view.sh", "fashion_mnist_view", "unmix"),
            ("small_data.sh", "small_data", "swav_fm_4000"),
            ("small_data_pixels.sh", "small_data_pixels", "pixels_fm_4000")]


@pytest.mark.parametrize("script, study", [(script, study) for script, study, _ in REFUSING])
def test_refuses_uncommitted_changes_unless_forced(tmp_path, script, study):
    scratch = scratch_repo(tmp_path)
    with open(scratch / "scripts" / script, "a") as handle:
        handle.write("# changed\n")
    done = run_script(scratch, script)
    assert done.returncode == 2 and not (scratch / "runs").exists() and not (scratch / "results").exists()
    assert done.stderr.startswith(f"{script}: error: 1 tracked file(s) differ from commit ")
    assert "FORCE=1" in done.stderr and len(done.stderr.splitlines()) == 1
    forced = run_script(scratch, script, FORCE="1")
    assert forced.returncode == 0, forced.stderr
    provenance = json.loads((scratch / "results" / "runs" / study / "provenance.json").read_text())
    assert provenance["git_dirty"] is True


def test_tables_another_script_rewrote_are_not_uncommitted_code(tmp_path):
    """results/ is what the scripts write: one script's regenerated tables neither stop the next nor mark it dirty."""
    scratch = scratch_repo(tmp_path)
    (scratch / "results" / "small_data").mkdir(parents=True)
    (scratch / "results" / "small_data" / "table.md").write_text("| old |\n")
    git(scratch, "add", "results")
    git(scratch, "commit", "-q", "-m", "tables")
    (scratch / "results" / "small_data" / "table.md").write_text("| regenerated |\n")
    done = run_script(scratch, "fashion_mnist_bf16.sh")
    assert done.returncode == 0, done.stderr
    provenance = json.loads((scratch / "results" / "runs" / "fashion_mnist_bf16" / "provenance.json").read_text())
    assert provenance["git_dirty"] is False
    # the published numbers are what the tables read, not what they write
    (scratch / "results" / "published.csv").write_text("method\n")
    git(scratch, "add", "results/published.csv")
    git(scratch, "commit", "-q", "-m", "published")
    (scratch / "results" / "published.csv").write_text("method\nswav\n")
    refused = run_script(scratch, "fashion_mnist_bf16.sh", OUT="runs/again")
    assert refused.returncode == 2 and "1 tracked file(s) differ" in refused.stderr


@pytest.mark.parametrize("script, study, run", REFUSING)
def test_refuses_an_out_folder_that_holds_runs(tmp_path, script, study, run):
    scratch = scratch_repo(tmp_path)
    (scratch / "runs" / study / run).mkdir(parents=True)
    done = run_script(scratch, script)
    assert done.returncode == 2 and f"OUT=runs/{study} is not empty" in done.stderr
    assert not (scratch / "results").exists()


def test_tries_trains_and_scores_each_named_try_and_refuses_the_rest(tmp_path):
    """scripts/fashion_mnist_tries.sh: each try named in TRIES is trained into OUT/<try> and scored at k=20 and
    k=200 (two records), the others are not run; a try whose folder already holds a run is refused, not resumed, and
    a name that is no try is refused with the names that are."""
    scratch = scratch_repo(tmp_path)
    shutil.copy(ROOT / "scripts" / "fashion_mnist_tries.sh", scratch / "scripts")
    done = run_script(scratch, "fashion_mnist_tries.sh", TRIES="R P")
    assert done.returncode == 0, done.stderr
    out = scratch / "runs" / "fashion_mnist_tries"
    assert sorted(path.name for path in out.iterdir() if path.is_dir()) == ["P", "R"]
    for name in ("R", "P"):
        assert len((out / name / "metrics.jsonl").read_text().splitlines()) == 2
        assert f"trained runs/fashion_mnist_tries/{name}" in (out / f"{name}.log").read_text()
    assert done.stdout.count("trained in") == 2
    again = run_script(scratch, "fashion_mnist_tries.sh", TRIES="R")
    assert again.returncode == 2 and "runs/fashion_mnist_tries/R is not empty" in again.stderr
    unknown = run_script(scratch, "fashion_mnist_tries.sh", TRIES="Z")
    assert unknown.returncode == 2
    assert unknown.stderr == ("fashion_mnist_tries.sh: error: TRIES names 'Z', which is not a try: "
                              "choose among R P A B C D E F G I J K L M N O\n")


def test_small_data_tries_refuses_an_out_folder_that_holds_runs(tmp_path):
    """scripts/small_data_tries.sh starts nothing, not even the subset's export, over an earlier try."""
    scratch = scratch_repo(tmp_path)
    shutil.copy(ROOT / "scripts" / "small_data_tries.sh", scratch / "scripts")
    (scratch / "runs" / "small_data_tries" / "A").mkdir(parents=True)
    done = run_script(scratch, "small_data_tries.sh")
    assert done.returncode == 2
    assert done.stderr == ("small_data_tries.sh: error: OUT=runs/small_data_tries is not empty: remove it or choose "
                           "another OUT (its runs would resume, made by other code)\n")
    assert sorted(path.name for path in (scratch / "runs" / "small_data_tries").iterdir()) == ["A"]


@pytest.mark.parametrize("script, study, failing, finished", [
    # a failure in the first queue while the second one still runs, and one in the second queue
    ("fashion_mnist.sh", "fashion_mnist", "eval_knn.py:fashion_mnist/swav ", "fashion_mnist/pixels/metrics.jsonl"),
    ("fashion_mnist.sh", "fashion_mnist", "main_pretrain.py:fashion_mnist/npid", "fashion_mnist/selfclassifier.time"),
    ("fashion_mnist_longer.sh", "fashion_mnist_longer", "eval_cluster.py:fashion_mnist_longer/unmix",
     "fashion_mnist_longer/pixels/metrics.jsonl"),
    ("fashion_mnist_wider.sh", "fashion_mnist_wider", "eval_cluster.py:fashion_mnist_wider/unmix_w12",
     "fashion_mnist_wider/swav_multicrop/metrics.jsonl"),
    ("small_data.sh", "small_data", "main_pretrain.py:small_data/swav_fm_4000", "small_data/unmix_digits.time"),
])
def test_a_failure_in_either_queue_keeps_nothing_and_says_so(tmp_path, script, study, failing, finished):
    """`wait $a && wait $b` went on to keep records and build tables after queue a failed; now every queue is waited
    for and the script fails with a line naming where to look."""
    scratch = scratch_repo(tmp_path)
    done = run_script(scratch, script, FAIL=failing)
    assert done.returncode == 2, done.stderr
    assert f"{script}: error: a run or an evaluation failed" in done.stderr and "nothing was kept" in done.stderr
    assert (scratch / "runs" / finished).exists()  # the other queue ran to its end
    assert not (scratch / "results").exists() and not (scratch / "collect_results.args").exists()


@pytest.mark.parametrize("script, failing", [("small_data_pixels.sh", "eval_cluster.py:pixels_fm_4000"),
                                             ("small_data.sh", "eval_knn.py:pixels_digits")])
def test_a_failed_evaluation_whose_output_goes_to_a_log_says_so_on_the_terminal(tmp_path, script, failing):
    """The pixel baselines' block sends its stderr to a log, and the ERR trap's line went there too: the script
    stopped with the evaluation's status and said nothing."""
    scratch = scratch_repo(tmp_path)
    done = run_script(scratch, script, FAIL=failing)
    assert done.returncode == 3
    assert f"{script}: error: a command failed (exit 3)" in done.stderr, done.stderr
    assert not (scratch / "results").exists()


def test_a_failed_training_names_its_log(tmp_path):
    scratch = scratch_repo(tmp_path)
    done = run_script(scratch, "fashion_mnist_bf16.sh", FAIL="main_pretrain.py:unmix_w16")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == ("fashion_mnist_bf16.sh: error: unmix_w16: main_pretrain.py "
                                                    "failed (exit 3): see runs/fashion_mnist_bf16/unmix_w16.log")


def test_scan_started_again_sums_the_wall_time_of_its_starts(tmp_path):
    """scan_fashion_mnist.sh may be started again on its OUT (each stage resumes): the wall time it keeps is that of
    every start, not of the last one (which may only find the stage finished)."""
    scratch = scratch_repo(tmp_path)
    emb = scratch / "runs" / "emb"
    emb.mkdir(parents=True)
    (emb / "checkpoint.pth").touch()
    (emb / "config.yaml").write_text("args: {}\n")
    out = tmp_path / "out"
    first = run_script(scratch, "scan_fashion_mnist.sh", EMB=str(emb), OUT=str(out), FAIL="eval_knn.py:selflabel")
    assert first.returncode != 0
    for name in ("scan", "selflabel"):  # as if the first start had trained for 1000 s
        (out / f"{name}.time").write_text("1000\n")
    assert run_script(scratch, "scan_fashion_mnist.sh", EMB=str(emb), OUT=str(out), KEEP="1").returncode == 0
    kept = scratch / "results" / "runs" / "scan_fashion_mnist" / "emb"
    # 1000 s, and the whole seconds of bash's clock the second start took (the last start alone: a few)
    assert all(1000 <= int((kept / name / "train_wall_seconds").read_text()) <= 1010 for name in ("scan", "selflabel"))


def test_scan_keeps_records_only_from_committed_code(tmp_path):
    """With KEEP=1 scan_fashion_mnist.sh refuses a dirty tree (FORCE=1 keeps the records marked dirty) and writes
    provenance.json beside them, as the other result scripts do."""
    scratch = scratch_repo(tmp_path)
    emb = scratch / "runs" / "emb"
    emb.mkdir(parents=True)
    (emb / "checkpoint.pth").touch()
    (emb / "config.yaml").write_text("args: {}\n")
    with open(scratch / "scripts" / "scan_fashion_mnist.sh", "a") as handle:
        handle.write("# changed\n")
    out = str(tmp_path / "out")
    refused = run_script(scratch, "scan_fashion_mnist.sh", EMB=str(emb), OUT=out, KEEP="1")
    assert refused.returncode == 2 and not (tmp_path / "out").exists() and not (scratch / "results").exists()
    assert refused.stderr.startswith("scan_fashion_mnist.sh: error: 1 tracked file(s) differ from commit ")
    forced = run_script(scratch, "scan_fashion_mnist.sh", EMB=str(emb), OUT=out, KEEP="1", FORCE="1")
    assert forced.returncode == 0, forced.stderr
    provenance = json.loads((scratch / "results/runs/scan_fashion_mnist/emb/provenance.json").read_text())
    assert provenance["script"] == "scripts/scan_fashion_mnist.sh" and provenance["git_dirty"] is True


def test_refuses_a_script_that_no_commit_holds(tmp_path):
    """The records name their script: a copy of a result script that is not committed keeps nothing, even on an
    otherwise clean tree (git status does not list untracked files)."""
    scratch = scratch_repo(tmp_path)
    study = (scratch / "scripts" / "fashion_mnist_longer.sh").read_text()
    (scratch / "scripts" / "my_study.sh").write_text(study.replace("begin_study fashion_mnist_longer",
                                                                   "begin_study my_study"))
    done = run_script(scratch, "my_study.sh")
    assert done.returncode == 2 and not (scratch / "runs").exists() and not (scratch / "results").exists()
    assert done.stderr == (f"my_study.sh: error: scripts/my_study.sh is not in commit "
                           f"{git(scratch, 'rev-parse', 'HEAD')[:12]}: commit it, so that the records it keeps name "
                           f"their maker\n")


def test_small_data_passes_an_out_folder_with_a_space_as_one_argument(tmp_path):
    scratch = scratch_repo(tmp_path)
    out = tmp_path / "small data"
    done = run_script(scratch, "small_data.sh", OUT=str(out), ARGS_LOG=str(tmp_path / "args"))
    assert done.returncode == 0, done.stderr
    arguments = (tmp_path / "args").read_text().splitlines()
    # written by the export, read by the pixel baseline's two evaluations and by each recipe's run
    assert arguments.count(f"{out}/data/fm_4000") == 5
    assert str(tmp_path / "small") not in arguments
