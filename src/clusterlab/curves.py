"""Training curves of a run, from RUN/train_log.jsonl: the loss, the other logged terms, the learning rate and the
kNN monitor against epochs, drawn as one PNG with a panel each (collect_results.py --curves); a linear probe's log
(eval_linear.py) draws its test accuracy after each epoch in the monitor's place.

The x axis is in epochs: a step record sits at global_step / steps per epoch (its step is done, so an epoch's last
step lands on a whole number and 2.5 is half-way through the third epoch); an epoch_end record (the epoch's mean of
every term, drawn as dots over the logged steps) and a kNN monitor record, both written once their epoch is over,
at epoch + 1. The steps per epoch come from the log itself: an epoch_end record's global_step /
(epoch + 1), or global_step = epoch * steps_per_epoch + step + 1 of a step record past the first epoch. A run still in
its first epoch has neither: its curves are drawn against steps.
"""
from __future__ import annotations

import dataclasses
import errno
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import rundir

# Fields of a step record that are not terms of the loss (the engine's own).
STEP_FIELDS = ("epoch", "step", "global_step", "lr", "loss", "img_per_s", "time", "loss_scale")


@dataclass
class Curves:
    """What the PNG draws; every value is the train log's own, in its order."""

    steps_per_epoch: int | None                     # None: the log does not tell yet (first epoch running)
    x: np.ndarray                                   # of every step record, in epochs (in steps without the above)
    loss: np.ndarray
    lr: np.ndarray
    terms: dict = field(default_factory=dict)       # name -> values (NaN where a record lacks it), those != loss
    end_x: np.ndarray = field(default_factory=lambda: np.zeros(0))  # epoch + 1 of every epoch_end record
    end_means: dict = field(default_factory=dict)   # term -> its epoch means (every term, those == loss included)
    # the loss's epoch means (a one-term method's term's where the log has none; NaN: not logged)
    end_loss: np.ndarray = field(default_factory=lambda: np.zeros(0))
    monitor_x: np.ndarray = field(default_factory=lambda: np.zeros(0))  # epoch + 1 of every kNN monitor record
    monitor_top1: np.ndarray = field(default_factory=lambda: np.zeros(0))
    monitor_top5: np.ndarray = field(default_factory=lambda: np.zeros(0))
    monitor_label: str = ""                         # its k, temperature and train features
    # a linear probe's log has its test accuracy after each epoch in the monitor's place
    monitor_name: str = "kNN monitor"
    damaged_lines: list = field(default_factory=list)  # numbers of the log's lines that are not records (left out)


def steps_per_epoch(records: list[dict]) -> int | None:
    for record in records:
        if record.get("epoch_end"):
            count = record["global_step"] // (record["epoch"] + 1)
        elif "step" in record and record["epoch"] > 0:
            count = (record["global_step"] - record["step"] - 1) // record["epoch"]
        else:
            continue
        if count > 0:
            return count
    return None


def _numbers(record: dict, *keys: str) -> bool:
    return all(rundir.is_number(record.get(key)) for key in keys) and record["epoch"] >= 0


def _last_of_each(records: list[dict], key: str) -> list[dict]:
    """The last record of each value of `key`, in its order: a log joined by hand, or one written before the engine
    cut the log back on resume, may hold a step or an epoch twice (drawn as a line running back over itself)."""
    return sorted({record[key]: record for record in records}.values(), key=lambda record: record[key])


def training_curves(records: list[dict]) -> Curves:
    """The arrays of the plot from the records of a train_log.jsonl (a record whose fields the plot needs are not
    numbers, or a negative epoch, written by hand or by another program, is left out; of records of the same step or
    epoch the last counts)."""
    steps = _last_of_each([r for r in records if "step" in r
                           and _numbers(r, "epoch", "step", "global_step", "loss", "lr")], "global_step")
    ends = _last_of_each([r for r in records if r.get("epoch_end") and _numbers(r, "epoch", "global_step")], "epoch")
    monitor = _last_of_each([r for r in records if r.get("knn_monitor") and _numbers(r, "epoch", "top1")], "epoch")
    probe = _last_of_each([r for r in records if "step" not in r and _numbers(r, "epoch", "test_top1")], "epoch")
    per_epoch = steps_per_epoch([*ends, *steps])
    global_step = np.array([r["global_step"] for r in steps], dtype=np.float64)
    loss = np.array([r["loss"] for r in steps], dtype=np.float64)
    names = dict.fromkeys(k for r in steps for k, v in r.items() if k not in STEP_FIELDS and rundir.is_number(v))
    terms = {name: np.array([r.get(name, np.nan) for r in steps], dtype=np.float64) for name in names}
    kept = {name: values for name, values in terms.items() if not np.array_equal(values, loss, equal_nan=True)}
    end_means = {name: np.array([r.get(f"{name}_mean", np.nan) for r in ends], dtype=np.float64) for name in names}
    end_loss = np.array([r.get("loss_mean", np.nan) for r in ends], dtype=np.float64)
    same_as_loss = [name for name in names if name not in kept]
    if same_as_loss:  # a one-term method's term is its loss: its means where an older version logged no loss_mean
        end_loss = np.where(np.isnan(end_loss), end_means[same_as_loss[0]], end_loss)
    label, name, top1, top5 = "", "kNN monitor", "top1", "top5"
    if monitor:
        last = monitor[-1]
        # (k_used: the voters where fewer train features than k were there to vote)
        k = last.get("k_used", last.get("k"))
        label = f"k={k}, T={last.get('temperature')}, {last.get('train_features')} train features"
    elif probe:  # eval_linear.py's log: the probe's test accuracy after every epoch
        monitor, label, name, top1, top5 = probe, "after each epoch", "linear probe", "test_top1", "test_top5"
    return Curves(
        steps_per_epoch=per_epoch,
        x=global_step / per_epoch if per_epoch else global_step,
        loss=loss,
        lr=np.array([r["lr"] for r in steps], dtype=np.float64),
        # a term equal to the loss everywhere (a one-term method) would only draw the loss panel again
        terms=kept,
        end_x=np.array([r["epoch"] + 1 for r in ends], dtype=np.float64),
        end_means=end_means,
        end_loss=end_loss,
        monitor_x=np.array([r["epoch"] + 1 for r in monitor], dtype=np.float64),
        monitor_top1=np.array([r[top1] for r in monitor], dtype=np.float64),
        monitor_top5=np.array([r.get(top5, np.nan) for r in monitor], dtype=np.float64),
        monitor_label=label,
        monitor_name=name)


def read_curves(run_dir: str | os.PathLike) -> Curves:
    path = Path(run_dir) / "train_log.jsonl"
    if not path.exists():  # a link to nowhere (read_jsonl takes a missing log for an empty one)
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
    records, damaged = rundir.read_jsonl_and_damage(path)
    return dataclasses.replace(training_curves(records), damaged_lines=damaged)


def draw(curves: Curves, title: str, path: str | os.PathLike, dpi: int = 100) -> None:
    """One PNG: loss; the other terms (when the method logs any), each with its epoch means; learning rate; kNN
    monitor (when logged)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .eval.plots import save_png

    panels = ["loss", *(["terms"] if curves.terms else []), "lr", *(["monitor"] if len(curves.monitor_x) else [])]
    figure, axes = plt.subplots(len(panels), 1, sharex=True, figsize=(7, 1.8 * len(panels) + 0.7), squeeze=False)
    for panel, ax in zip(panels, axes[:, 0]):
        if panel == "loss":
            ax.plot(curves.x, curves.loss, lw=1, label="logged steps")
            if not np.isnan(curves.end_loss).all():
                ax.plot(curves.end_x, curves.end_loss, "o", ms=4, color="C0", label="epoch mean")
                ax.legend(fontsize=7)
            ax.set_ylabel("loss")
        elif panel == "terms":
            for index, (name, values) in enumerate(curves.terms.items()):
                ax.plot(curves.x, values, lw=1, alpha=0.6, color=f"C{index}", label=name)
                ax.plot(curves.end_x, curves.end_means[name], "o", ms=4, color=f"C{index}")
            ax.set_ylabel("logged terms")
            ax.legend(fontsize=7, ncol=min(4, len(curves.terms)))
        elif panel == "lr":
            ax.plot(curves.x, curves.lr, lw=1)
            ax.set_ylabel("learning rate")
        else:
            ax.plot(curves.monitor_x, curves.monitor_top1, marker="o", label="top-1")
            if not np.isnan(curves.monitor_top5).all():
                ax.plot(curves.monitor_x, curves.monitor_top5, marker="o", label="top-5")
            ax.set_ylabel(f"{curves.monitor_name.split()[0]} accuracy")
            ax.set_title(f"{curves.monitor_name} on the test split ({curves.monitor_label})", fontsize=8)
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("epoch" if curves.steps_per_epoch else "step (epoch length not logged yet)")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    save_png(figure, path, dpi=dpi)
