"""Training curves (curves.py, collect_results.py --curves): the arrays a run's PNG draws are the values its
train_log.jsonl holds, placed on an epoch axis that is worked out here independently (digits: 898 training images in
batches of 64 make 14 steps an epoch; Fashion-MNIST: 60,000 in batches of 128 make 468)."""
from __future__ import annotations

import json

import matplotlib.image
import numpy as np
import pytest
import yaml

from clusterlab import curves
from conftest import ROOT, TWO_EPOCHS, assert_ok, copy_run, run_script, step_losses

STEPS_PER_EPOCH = 898 // 64


def log_records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def test_curves_of_a_tiny_run_are_its_logged_values_against_epochs(tiny_run, tmp_path):
    records = log_records(tiny_run)
    steps = [r for r in records if "step" in r]
    monitor = [r for r in records if r.get("knn_monitor")]
    assert len(monitor) == 2 and len(steps) >= 4  # --knn_monitor_every 1 over 2 epochs; steps 0 and 13 of each
    drawn = curves.read_curves(tiny_run)
    assert drawn.steps_per_epoch == STEPS_PER_EPOCH
    expected_x = [(r["epoch"] * STEPS_PER_EPOCH + r["step"] + 1) / STEPS_PER_EPOCH for r in steps]
    assert drawn.x.tolist() == expected_x and drawn.x[-1] == 2.0  # the last step ends the second epoch
    assert drawn.loss.tolist() == [r["loss"] for r in steps]
    assert drawn.lr.tolist() == [r["lr"] for r in steps]
    assert drawn.terms == {}  # SwAV's one term is its loss, drawn once
    assert drawn.end_x.tolist() == [1.0, 2.0]
    assert drawn.end_means["swav"].tolist() == [r["swav_mean"] for r in records if r.get("epoch_end")]
    assert drawn.monitor_x.tolist() == [1.0, 2.0]
    assert drawn.monitor_top1.tolist() == [r["top1"] for r in monitor]
    assert drawn.monitor_top5.tolist() == [r["top5"] for r in monitor]
    assert drawn.monitor_label == "k=200, T=0.1, recomputed train features"

    out = tmp_path / "out"
    result = run_script("collect_results.py", "--root", tiny_run, "--out", out, "--published", "")
    assert_ok(result)
    assert f"the training curves of 1 run(s) (curves/) written to {out}/" in result.stdout
    image = matplotlib.image.imread(out / "curves" / f"{tiny_run.name}.png")
    assert image.ndim == 3 and image.shape[0] > 300  # loss, learning rate and monitor panels


def test_terms_that_start_mid_run_and_the_epoch_means_of_a_real_log():
    """Super-AND's committed Fashion-MNIST log: several terms besides the loss, ans_consistency only from round 1."""
    run = ROOT / "results" / "runs" / "fashion_mnist" / "superand"
    args = yaml.safe_load((run / "config.yaml").read_text())["args"]
    per_epoch = 60000 // args["batch_size"]
    records = log_records(run)
    steps = [r for r in records if "step" in r]
    drawn = curves.read_curves(run)
    assert drawn.steps_per_epoch == per_epoch
    assert drawn.x.tolist() == [r["global_step"] / per_epoch for r in steps]
    assert sorted(drawn.terms) == ["and", "ans_consistency", "aug", "round", "ue", "ue_weight"]
    for name, values in drawn.terms.items():
        logged = [r.get(name, np.nan) for r in steps]
        np.testing.assert_array_equal(values, logged)  # NaN exactly where the record has no such term
    assert 0 < np.isnan(drawn.terms["ans_consistency"]).sum() < len(steps)
    ends = [r for r in records if r.get("epoch_end")]
    assert drawn.end_x.tolist() == list(range(1, args["epochs"] + 1))
    np.testing.assert_array_equal(drawn.end_means["ans_consistency"],
                                  [r.get("ans_consistency_mean", np.nan) for r in ends])
    assert drawn.monitor_x.size == 0  # trained without the monitor: no panel for it


def test_a_run_in_its_first_epoch_is_drawn_against_steps(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    first = [r for r in log_records(run) if r["epoch"] == 0 and "step" in r][:1]
    (run / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in first))
    drawn = curves.read_curves(run)
    assert drawn.steps_per_epoch is None and drawn.x.tolist() == [first[0]["global_step"]]
    curves.draw(drawn, "first epoch", tmp_path / "first.png")
    assert (tmp_path / "first.png").stat().st_size > 0


def test_lines_of_a_train_log_that_are_not_records_are_skipped(tiny_run, tmp_path):
    """A line that is JSON but no object (`null`, a list) is skipped like a line cut short, not a traceback."""
    run = copy_run(tiny_run, tmp_path / "run")
    with open(run / "train_log.jsonl", "a") as log:
        log.write('null\n[1, 2]\n"text"\n')
    assert curves.read_curves(run).loss.tolist() == curves.read_curves(tiny_run).loss.tolist()


def test_lines_with_bytes_that_are_not_utf8_or_fields_that_are_not_numbers_are_skipped(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    with open(run / "train_log.jsonl", "ab") as log:
        log.write(b'{"epoch": 2, "step": 0, "global_step": 29, "lr": 0.1, "loss": "inf?"}\n\xff\xfe\n'
                  b'{"epoch": 2, "step": 1, "global_step": 30, "loss": 1.0}\n'
                  b'{"epoch": "0", "epoch_end": true, "global_step": 4}\n{"epoch": 0, "epoch_end": true}\n'
                  b'{"epoch": 1, "step": "0", "global_step": 15, "lr": 0.1, "loss": 1.0}\n')
    drawn, expected = curves.read_curves(run), curves.read_curves(tiny_run)
    assert drawn.loss.tolist() == expected.loss.tolist() and drawn.steps_per_epoch == STEPS_PER_EPOCH


def test_a_term_equal_to_the_loss_is_drawn_once_even_where_both_are_nan():
    steps = [{"epoch": 0, "step": step, "global_step": step + 1, "lr": 0.1, "loss": loss, "swav": loss}
             for step, loss in enumerate([2.0, float("nan"), 1.5])]
    assert curves.training_curves(steps).terms == {}


def test_the_epoch_mean_of_the_loss_is_logged_for_a_method_of_several_terms(tmp_path):
    """Un-Mix's loss sums three terms, none of them equal to it: its epoch means were logged for the terms only, and
    the loss panel had no dots."""
    run = tmp_path / "unmix"
    assert_ok(run_script("main_pretrain.py", *TWO_EPOCHS, "--method", "unmix", "--output_dir", run))
    drawn = curves.read_curves(run)
    assert sorted(drawn.terms) == ["lam", "mix", "mix_rev", "swav"]
    assert drawn.end_loss.tolist() == [sum(step_losses(run, epoch)) / STEPS_PER_EPOCH for epoch in (0, 1)]
    curves.draw(drawn, "unmix", tmp_path / "unmix.png")


def test_a_figure_that_fails_half_written_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    """Figures are written like checkpoints (temporary file, then rename): a write that fails part-way (a full disk)
    keeps the older PNG of that name, and leaves no temporary file."""
    import contextlib
    import errno
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from clusterlab.eval.plots import confusion_png

    path = tmp_path / "kmeans_k3_confusion.png"
    confusion_png([0, 1, 2, 2], [1, 0, 2, 2], 3, ["a", "b", "c"], path, "before")
    before = path.read_bytes()

    def fails_half_way(canvas, target, **kwargs):
        whole = io.BytesIO()
        # matplotlib's own measuring pass stops in here, as it would
        write_png(canvas, whole, **{k: v for k, v in kwargs.items() if k in ("metadata", "pil_kwargs")})
        with contextlib.ExitStack() as stack:
            out = target if hasattr(target, "write") else stack.enter_context(open(target, "wb"))
            out.write(whole.getvalue()[:100])
        raise OSError(errno.ENOSPC, "No space left on device")

    write_png = FigureCanvasAgg.print_png

    monkeypatch.setattr(FigureCanvasAgg, "print_png", fails_half_way)
    with pytest.raises(OSError) as info:
        confusion_png([0, 1, 2, 2], [0, 1, 2, 2], 3, ["a", "b", "c"], path, "after")
    assert info.value.errno == errno.ENOSPC
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_confusion_matrix_of_imagenet_size_fits_a_figure(tmp_path):
    """1000 classes by 2000 clusters: at the readable cell size the figure was 700 x 350 inches (Agg refuses more
    than 2**16 pixels a side, and a few hundred rows already took gigabytes); the cells shrink to fit instead."""
    from PIL import Image

    from clusterlab.eval.plots import MAX_INCHES, confusion_png

    rng = np.random.default_rng(0)
    truth = rng.integers(0, 1000, 20_000)
    path = tmp_path / "kmeans_k2000_confusion.png"
    confusion_png(truth, rng.integers(0, 2000, 20_000), 2000, [f"class {c}" for c in range(1000)], path, "big")
    width, height = Image.open(path).size
    assert width <= (MAX_INCHES + 2) * 120 and height <= (MAX_INCHES + 2) * 120
    # a readable size keeps its cells (0.35 inch each) and labels
    small = tmp_path / "kmeans_k3_confusion.png"
    confusion_png([0, 1, 2, 2], [1, 0, 2, 2], 3, ["a", "b", "c"], small, "small")
    assert Image.open(small).size[0] < 600


def test_a_sample_grid_decodes_image_files_at_thumbnail_size(tmp_path, monkeypatch):
    """eval_cluster's sample grid decoded each image file at the set's nominal size (its median shorter side): 200
    photos of 2,000 px took a minute and gigabytes for cells of 80 pixels. Each comes at THUMBNAIL_PX now, the
    centre square of the file as the test view cuts it; a set of smaller images keeps its own size."""
    import fabricate
    from clusterlab.data import load
    from clusterlab.eval import plots

    fabricate.make_imagefolder(tmp_path / "large", n_per_class=3, classes=2, size=300, grey=False)
    fabricate.make_imagefolder(tmp_path / "small", n_per_class=3, classes=2, size=28)
    shown = []
    monkeypatch.setattr(plots, "save_png", lambda figure, path, **kwargs: shown.append(figure))
    for folder, size, shape in (("large", 300, (plots.THUMBNAIL_PX, plots.THUMBNAIL_PX, 3)), ("small", 28, (28, 28))):
        images = load("imagefolder", "test", str(tmp_path / folder))
        assert images.image_size == size
        assert {picture.shape for picture in plots._images(images, np.arange(len(images)))} == {shape}
        plots.cluster_samples_png(images, np.arange(len(images)) % 2, "unused.png", folder)
        drawn = [axis.get_images()[0].get_array().shape for axis in shown.pop().axes if axis.get_images()]
        assert drawn == [shape] * len(images)


def test_a_confusion_matrix_title_fits_its_figure(monkeypatch):
    """eval_cluster's titles (run, assignment, ACC, NMI, ARI) ran off a plot of few classes: the ACC was cut off."""
    from clusterlab.eval import plots

    shown = []
    monkeypatch.setattr(plots, "save_png", lambda figure, path, **kwargs: shown.append(figure))
    title = "swav_digits_w4_ep0010 k-means K=5 (backbone, fit on train): ACC 34.67 NMI 12.34 ARI 5.67"
    plots.confusion_png([0, 1, 2, 3, 4], [1, 0, 2, 3, 4], 5, list("abcde"), "unused.png", title)
    (figure,) = shown
    figure.canvas.draw()
    text = figure.axes[0].title
    box = text.get_window_extent()
    assert text.get_text().replace("\n", " ") == title
    assert 0 <= box.x0 and box.x1 <= figure.bbox.width, (box, figure.bbox)


def test_a_one_term_log_of_two_versions_has_a_loss_mean_for_every_epoch():
    """An epoch logged before loss_mean existed, one after (a run resumed across the change): the one term's mean
    stands in for the first, as it equals the loss."""
    steps = [{"epoch": epoch, "step": 0, "global_step": epoch + 1, "lr": 0.1, "loss": 2.0 - epoch, "swav": 2.0 - epoch}
             for epoch in (0, 1)]
    ends = [{"epoch": 0, "epoch_end": True, "global_step": 1, "swav_mean": 2.5},
            {"epoch": 1, "epoch_end": True, "global_step": 2, "loss_mean": 1.5, "swav_mean": 1.5}]
    assert curves.training_curves([steps[0], ends[0], steps[1], ends[1]]).end_loss.tolist() == [2.5, 1.5]


def test_a_step_or_epoch_logged_twice_is_drawn_once_and_a_negative_epoch_is_left_out(tiny_run, tmp_path):
    """A log joined by hand (or written before the engine cut it back on resume) repeats epoch 1: the last record of
    each step and epoch is drawn, in order; a record of epoch -1 divided by zero before."""
    run = copy_run(tiny_run, tmp_path / "run")
    records = log_records(tiny_run)
    second = [r for r in records if r["epoch"] == 1]
    again = [{**r, "loss": r["loss"] + 1} if "step" in r else r for r in second]
    bad = [{"epoch": -1, "epoch_end": True, "global_step": 5},
           {"epoch": -1, "step": 0, "global_step": 0, "lr": 0.1, "loss": 1.0}]
    (run / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*bad, *records, *again]))
    drawn, expected = curves.read_curves(run), curves.read_curves(tiny_run)
    assert drawn.steps_per_epoch == STEPS_PER_EPOCH
    assert drawn.x.tolist() == expected.x.tolist() and drawn.end_x.tolist() == [1.0, 2.0]
    assert drawn.monitor_x.tolist() == [1.0, 2.0]
    second_steps = drawn.x > 1
    assert drawn.loss[second_steps].tolist() == [r["loss"] for r in again if "step" in r]
    assert drawn.loss[~second_steps].tolist() == expected.loss[~second_steps].tolist()


def test_a_probe_below_the_run_gets_its_accuracy_drawn_beside_the_run_and_an_empty_log_none(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    probed = run_script("eval_linear.py", "--run", run, "--epochs", "2", "--batch_size", "64", "--cached_features",
                        "true", "--device", "cpu")
    assert_ok(probed)
    (probe,) = run.glob("linear_ep*")
    logged = [r for r in log_records(probe) if "test_top1" in r]
    drawn = curves.read_curves(probe)
    assert drawn.monitor_name == "linear probe" and drawn.monitor_x.tolist() == [1.0, 2.0]
    assert drawn.monitor_top1.tolist() == [r["test_top1"] for r in logged]
    (run / "later").mkdir()
    (run / "later" / "train_log.jsonl").write_text("")  # a run that has not logged a step yet
    out = tmp_path / "out"
    result = run_script("collect_results.py", "--root", run, "--out", out, "--published", "", "--plots", "false")
    assert_ok(result)
    assert f"note: {run / 'later' / 'train_log.jsonl'} holds no training step: no curves for it" in result.stdout
    assert "the training curves of 2 run(s)" in result.stdout
    assert sorted(str(path.relative_to(out / "curves")) for path in (out / "curves").rglob("*.png")) == [
        "run.png", f"run/{probe.name}.png"]


def test_damaged_lines_in_the_middle_of_a_log_are_named_and_a_last_line_cut_short_is_not(tiny_run, tmp_path):
    """A line in the middle of a log that is not a record (a hand edit, a disk fault) was left out of the curves
    without a word; a last line without its newline is one a crash cut short (the resumed run drops it) or one
    being written."""
    run = copy_run(tiny_run, tmp_path / "run")
    lines = (run / "train_log.jsonl").read_text().splitlines()
    damaged = [*lines[:2], '{"epoch": 0, "st', "", "[1, 2]", *lines[2:], '{"epoch": 1, "step": 13, "glo']
    (run / "train_log.jsonl").write_text("\n".join(damaged))
    drawn = curves.read_curves(run)
    assert drawn.damaged_lines == [3, 5]
    assert drawn.loss.tolist() == curves.read_curves(tiny_run).loss.tolist()
    out = tmp_path / "out"
    result = run_script("collect_results.py", "--root", run, "--out", out, "--published", "", "--plots", "false")
    assert_ok(result)
    assert (f"warning: {run / 'train_log.jsonl'}: 2 line(s) that are not JSON records (line 3, 5): left out of its "
            f"curves") in result.stderr
    (run / "train_log.jsonl").write_text("\n".join([*lines, '{"epoch": 1, "st']) + "\n")
    assert curves.read_curves(run).damaged_lines == [len(lines) + 1]  # ended by a newline: not cut short


def test_a_root_with_only_logs_without_a_step_writes_nothing_and_says_so(tmp_path):
    """It printed " written to ROOT/tables/" (a sentence without a subject) and left an empty folder there."""
    (tmp_path / "runs" / "starting").mkdir(parents=True)
    (tmp_path / "runs" / "starting" / "train_log.jsonl").write_text(json.dumps({"epoch": 0, "knn_top1": 0.5}) + "\n")
    result = run_script("collect_results.py", "--root", tmp_path / "runs", "--published", "")
    assert_ok(result)
    assert result.stdout.splitlines()[-1] == (f"nothing written: no metrics records with a usable number, and no "
                                              f"training log with a step, under {tmp_path / 'runs'}")
    assert not (tmp_path / "runs" / "tables").exists()


def test_a_run_folder_named_in_bytes_that_are_not_utf8_gets_its_curves(tiny_run, tmp_path):
    """Its title reached matplotlib with the undecodable byte as a lone surrogate (a traceback after the tables); a
    log that is a link to nowhere cannot be read (it was named a log with no step, while its metrics.jsonl beside it
    was named unreadable)."""
    root = tmp_path / "root"
    copy_run(tiny_run, root / "r\udcff")  # the folder b"r\xff"
    (root / "gone").mkdir()
    (root / "gone" / "train_log.jsonl").symlink_to(tmp_path / "nowhere.jsonl")
    out = tmp_path / "out"
    result = run_script("collect_results.py", "--root", root, "--out", out, "--published", "", "--plots", "false")
    assert_ok(result)
    assert (f"warning: {root / 'gone' / 'train_log.jsonl'}: cannot be read (No such file or directory): no curves "
            f"for it") in result.stderr
    assert "the training curves of 1 run(s)" in result.stdout
    assert (out / "curves" / "r\udcff.png").is_file()


def test_curves_of_runs_no_longer_under_the_root_are_removed_and_nothing_else(tiny_run, tmp_path):
    """A second collection into the same folder left the PNG of a run removed since beside the new ones. Only what a
    collection drew is ever removed: a file of one's own in OUT/curves stays, and so does a run called `curves`
    whose folder is OUT/curves (--out the root itself), with its own evaluation plots."""
    import shutil

    root, out = tmp_path / "root", tmp_path / "out"
    for name in ("kept", "removed", "deep/removed"):
        copy_run(tiny_run, root / name)
    collect = ("collect_results.py", "--root", root, "--out", out, "--published", "", "--plots", "false")
    assert_ok(run_script(*collect))
    drawn = sorted(p.relative_to(out / "curves").as_posix() for p in (out / "curves").rglob("*.png"))
    assert drawn == ["deep/removed.png", "kept.png", "removed.png"]
    (out / "curves" / "mine.png").write_bytes(b"not drawn here")
    shutil.rmtree(root / "removed")
    shutil.rmtree(root / "deep")
    result = run_script(*collect)
    assert_ok(result)
    assert "the training curves of 1 run(s)" in result.stdout
    assert sorted(p.name for p in (out / "curves").iterdir()) == [".drawn_by_collect_results", "kept.png", "mine.png"]

    run = copy_run(tiny_run, root / "curves")
    (run / "confusion.png").write_bytes(b"the run's own plot")
    for _ in range(2):
        assert_ok(run_script("collect_results.py", "--root", root, "--out", root, "--published", "", "--plots",
                             "false"))
    assert (run / "checkpoint.pth").is_file() and (run / "confusion.png").read_bytes() == b"the run's own plot"
    assert (run / "curves.png").is_file() and (run / "kept.png").is_file()


def test_the_monitor_names_the_voters_it_had_where_fewer_than_k():
    """A memory bank with fewer written rows than --knn_monitor_k votes with all of them: k_used, not k, in the
    panel's title."""
    log = [{"epoch": 0, "step": 0, "global_step": 1, "lr": 0.1, "loss": 1.0},
           {"epoch": 0, "knn_monitor": True, "top1": 0.5, "k": 200, "k_used": 64, "temperature": 0.1,
            "train_features": "memory_bank"},
           {"epoch": 1, "knn_monitor": True, "top1": 0.6, "k": 20, "temperature": 0.1, "train_features": "recomputed"}]
    assert curves.training_curves(log[:2]).monitor_label == "k=64, T=0.1, memory_bank train features"
    assert curves.training_curves(log).monitor_label == "k=20, T=0.1, recomputed train features"


def test_the_curves_list_keeps_odd_names_and_never_reaches_outside_its_folder(tiny_run, tmp_path):
    """The list of drawn PNGs was text with bytes that are not UTF-8 escaped: the PNG of a removed run so named
    stayed. A name listed below a linked folder (or an absolute one, the list edited by hand) names a file outside
    OUT/curves: left alone, where one in a linked folder was removed and the climb to its parent crashed."""
    import shutil

    root, out = tmp_path / "root", tmp_path / "out"
    copy_run(tiny_run, root / "kept")
    copy_run(tiny_run, root / "r\udcff")
    collect = ("collect_results.py", "--root", root, "--out", out, "--published", "", "--plots", "false")
    assert_ok(run_script(*collect))
    assert (out / "curves" / "r\udcff.png").is_file()
    shutil.rmtree(root / "r\udcff")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for name in ("r1.png", "absolute.png"):
        (elsewhere / name).write_bytes(b"not drawn here")
    (out / "curves" / "grid").symlink_to(elsewhere)
    listing = out / "curves" / ".drawn_by_collect_results"
    listing.write_text(json.dumps([*json.loads(listing.read_text()), "grid/r1.png", str(elsewhere / "absolute.png")]))
    result = run_script(*collect)
    assert_ok(result)
    assert not (out / "curves" / "r\udcff.png").exists() and (out / "curves" / "kept.png").is_file()
    assert sorted(p.name for p in elsewhere.iterdir()) == ["absolute.png", "r1.png"]
    assert json.loads(listing.read_text()) == ["kept.png"]
