"""What the class-assignment methods (SeLa, Self-Classifier, EmbedUL, SCAN and its self-labelling) share: heads and
the choice among them.

Each such method has one or more heads, each mapping an image to scores over its own number of classes. The
predicted class of a head is the argmax of its scores. Which head to report is decided without labels: the head
with the lowest mean training loss over the last completed epoch (EmbedUL's rule; SCAN records consistency -
entropy instead, upstream's selection formula), on the scale of log K where heads differ in size
(`lowest_loss_head`). The per-head
losses are summed over the epoch here, and when it ends each rank's sums are gathered and added up
(`on_epoch_end`), so every rank makes the same choice, and a run of one epoch chooses from that epoch.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

import torch
import torch.nn as nn

from .. import checkpoint, distributed, rundir
from ..config import starts_of
from ..data.augment import EvalView
from ..data.registry import same_images
from ..errors import CheckpointError, ConfigError, UserError
from .base import Method


def lowest_loss_head(losses: list[float], sizes: list[int] | None = None) -> int | None:
    """The head chosen without labels: the lowest mean training loss of the last epoch, each divided by log K (a
    cross-entropy over K clusters is log K at uniform predictions) so that heads of different sizes (Self-Classifier
    v2's) compare on one scale; among heads of one size, simply the lowest loss. Before any epoch ended there is
    nothing to choose by: None, unless `sizes` name a single head."""
    if not losses:
        return 0 if sizes is not None and len(sizes) == 1 else None
    scale = torch.ones(len(losses)) if sizes is None else torch.tensor([math.log(max(k, 2)) for k in sizes])
    return int((torch.tensor(losses) / scale).argmin())


class ClusterMethod(Method):
    program_kind = "cluster"
    # Sub-modules that `--pretrained` fills from a main_pretrain run (same names there).
    pretrained_parts: tuple = ("backbone",)
    # flags that shape the pre-trained parts: a run with other values cannot take their weights
    pretrained_flags: tuple = ("arch", "width")
    # The run a method's recipe starts from, where it is a later stage (a note says so when none is given), and the
    # methods of such a run (a note says so when --pretrained is another's: its weights fit, but not the recipe).
    starts_from: str | None = None
    starts_from_methods: tuple = ()

    def __init__(self, args: argparse.Namespace, info, device: torch.device):
        super().__init__(args, info, device)
        self._loss_sums: torch.Tensor | None = None
        self._loss_count = 0
        self.last_head_losses: list[float] = []
        self.pretrained_from: dict | None = None

    # ---- heads ----
    def head_logits(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Scores of every head for normalised test views."""
        raise NotImplementedError

    @property
    def head_sizes(self) -> list[int]:
        raise NotImplementedError

    def chosen_head(self) -> int | None:
        return lowest_loss_head(self.last_head_losses, self.head_sizes)

    # ---- per-head loss bookkeeping ----
    def record_head_losses(self, losses: list[torch.Tensor]) -> None:
        values = torch.stack([loss.detach().float() for loss in losses])
        self._loss_sums = values if self._loss_sums is None else self._loss_sums + values
        self._loss_count += 1

    def _rank_loss_totals(self) -> torch.Tensor | None:
        """Collective: each rank's per-head loss sums and step count, a row per rank in rank order (None before
        the epoch's first step)."""
        if self._loss_sums is None:
            return None
        totals = torch.cat([self._loss_sums, torch.tensor([float(self._loss_count)], device=self._loss_sums.device)])
        return distributed.all_gather_cat(totals[None])

    def on_epoch_end(self, epoch: int) -> None:
        rows = self._rank_loss_totals()
        if rows is not None:
            totals = rows.sum(dim=0)
            if totals[-1] > 0:
                self.last_head_losses = (totals[:-1] / totals[-1]).tolist()
        self._loss_sums, self._loss_count = None, 0

    def extra_state(self) -> dict:
        """The chosen head's evidence, and the sums of the epoch under way, every rank's: a run resumed in the
        middle of an epoch chooses from the whole epoch, and on as many processes as before each rank goes on
        from its own sums, so that the float32 totals are summed in the same order as in a run never stopped."""
        rows = self._rank_loss_totals()
        return {"last_head_losses": list(self.last_head_losses),
                "epoch_loss_totals": None if rows is None else rows.cpu(), "pretrained_from": self.pretrained_from}

    def load_extra_state(self, state: dict) -> None:
        self.last_head_losses = list(state.get("last_head_losses", []))
        self.pretrained_from = state.get("pretrained_from")
        rows = state.get("epoch_loss_totals")
        self._loss_sums, self._loss_count = None, 0
        if rows is None:
            return
        summed = rows.dim() == 1  # saved as the sum over ranks (before each rank's row was kept)
        if summed:
            rows = rows[None]
        if len(rows) == distributed.world_size():
            mine = rows[distributed.rank()]
        elif distributed.rank() == 0:
            # Another number of processes: rank 0 carries the whole epoch so far, rescaled to the new world size.
            # Every step adds one row per rank (a rank's mean loss and a count of 1), so the saved rows hold each
            # step W_saved times and the steps to come will add W_now rows each: unscaled, the steps before the
            # stop would weigh W_saved / W_now times as much as those after it in the epoch's means.
            # (a sum saved before the rows were kept already holds each step once per rank of a world size it does
            # not record: taken as this one's, as before the rescaling)
            scale = 1.0 if summed else distributed.world_size() / len(rows)
            mine = rows.sum(dim=0) * scale
            mine[-1] = round(float(rows[:, -1].sum()) * scale)
        else:
            return
        self._loss_sums, self._loss_count = mine[:-1].to(self.device), int(mine[-1])

    # ---- starting from a pre-trained run ----
    def load_pretrained(self, source: str, path: Path, state: dict) -> str:
        """Fill `pretrained_parts` from `--pretrained source`, read by `read_pretrained` (its file and state)."""
        saved = state.get("args", {})
        model = self.pretrained_weights(source, state)
        parts = {}
        for part in self.pretrained_parts:  # (before the flags: a run of another method differs in those too)
            prefix = f"{part}."
            parts[part] = {k[len(prefix):]: v for k, v in model.items() if k.startswith(prefix)}
            if not parts[part]:
                raise ConfigError(f"--pretrained {source!r} holds no {part!r} weights (method "
                                  f"{state.get('method')!r}); this method needs {', '.join(self.pretrained_parts)}")
        for key in self.pretrained_flags:
            if key in saved and saved[key] != getattr(self.args, key):
                raise ConfigError(f"--pretrained {source!r} was trained with --{key} {saved[key]!r}, this run has "
                                  f"--{key} {getattr(self.args, key)!r}")
        for part, weights in parts.items():
            module: nn.Module = getattr(self, part)
            try:
                missing, unexpected = module.load_state_dict(weights, strict=False)
            except RuntimeError as err:  # strict=False still refuses a weight of another shape
                raise ConfigError(f"--pretrained {source!r}: its {part!r} does not fit this model "
                                  f"({checkpoint.failure_reason(err)})") from None
            if missing or unexpected:
                raise ConfigError(f"--pretrained {source!r}: its {part!r} does not fit this model (missing "
                                  f"{missing[:3]}, unexpected {unexpected[:3]})")
        self.pretrained_from = pretrained_origin(path, state)
        if self.starts_from_methods and state.get("method") not in self.starts_from_methods and distributed.rank() == 0:
            print(f"note: --pretrained {source!r} is a {state.get('method')} run; {self.name}'s recipe starts from "
                  f"{self.starts_from}; it starts from that run's {' and '.join(self.pretrained_parts)} all the "
                  f"same", flush=True)
        trained_on = saved.get("dataset")
        if trained_on and not same_images(trained_on, self.args.dataset) and distributed.rank() == 0:
            # a transfer may be meant (CIFAR-100's backbone on CIFAR-10), a wrong path more often: said, not refused
            print(f"note: --pretrained {source!r} was trained on {trained_on}, this run trains on "
                  f"{self.args.dataset}: it starts from weights learnt on the other images, and normalises with "
                  f"mean {list(self.info.mean)}, std {list(self.info.std)} (the pre-trained run's unless --mean or "
                  f"--std say otherwise)", flush=True)
        return str(path)

    def recorded(self) -> dict:
        return {} if self.pretrained_from is None else {"pretrained_from": self.pretrained_from}

    def pretrained_weights(self, source: str, state: dict) -> dict:
        """The pre-trained checkpoint's weights under this model's names (SCAN's self-labelling renames the chosen
        head of its scan run)."""
        return state["model"]


def pretrained_file(source: str) -> Path:
    """The checkpoint `--pretrained source` names: a run directory's checkpoint.pth, or the file itself."""
    return Path(source) / "checkpoint.pth" if Path(source).is_dir() else Path(source)


def read_pretrained(source: str) -> tuple[Path, dict]:
    """The checkpoint of a run directory that finished training (its checkpoint.pth) or a checkpoint file, validated.
    A run still training, stopped or failed would hand over weights of some epoch without a word."""
    if Path(source).is_dir():
        status = rundir.read_status(source)
        if status.get("state", "finished") != "finished":
            where = rundir.position_words(status.get("epoch"), status.get("step", 0))
            raise ConfigError(f"--pretrained {source!r} has not finished training (status {status['state']!r} at "
                              f"{where}); let it finish, or name one of its checkpoint files to "
                              f"start from that state")
    path = pretrained_file(source)
    try:
        state = checkpoint.load(path, kind=("pretrain", "cluster"))
    except CheckpointError as err:
        # checkpoint.load names the file, not the flag nor what the flag takes: an evaluation's folder, a linear
        # probe's, a config.yaml or a typo would read as a broken checkpoint
        raise CheckpointError(f"--pretrained {source!r}: {err}; it takes the directory of a main_pretrain.py or "
                              f"main_cluster.py run that finished training, or one of their checkpoint files"
                              ) from None
    # (a checkpoint edited or written by other code: the weights were read with a KeyError's traceback)
    for entry in ("model", "args"):
        if not isinstance(state.get(entry), dict):
            raise CheckpointError(f"--pretrained {source!r}: checkpoint {str(path)!r} holds no {entry!r} mapping, "
                                  f"as every checkpoint main_pretrain.py and main_cluster.py write does: it was "
                                  f"edited or written by other code; give a run's directory or one of its checkpoint "
                                  f"files")
    checkpoint.require_finite_weights(state, path)
    return path, state


def pretrained_moved_on(source: str, recorded: dict | None) -> str | None:
    """A note for a resumed run whose `--pretrained source` no longer holds the weights it started from (another file,
    or the same run extended or trained again since): the run goes on from its own checkpoint, and pretrained_from
    keeps naming its real start. None where they agree, or `source` cannot be read (a moved run resumes as well)."""
    if not isinstance(recorded, dict):
        return None
    path = pretrained_file(source)
    try:
        state = checkpoint.load(path, kind=("pretrain", "cluster"), mmap=True)
    except (UserError, OSError):
        return None
    now = (str(path.resolve()), state.get("epoch"), state.get("step", 0))
    then = (recorded.get("checkpoint"), recorded.get("epoch"), recorded.get("step", 0))
    if now == then:
        return None
    return (f"--pretrained {source!r} now holds {now[0]} at {rundir.position_words(now[1], now[2])}; this run "
            f"started from {then[0]} at {rundir.position_words(then[1], then[2])} and goes on from its own checkpoint "
            f"(config.yaml's pretrained_from names that start); a new --output_dir starts from the weights there now")


def pretrained_origin(path: Path, state: dict) -> dict:
    """What a run started from, for its config.yaml: the pre-trained checkpoint's file, method, epoch and flags, the
    images it trained on (`training_set`, as its own config.yaml names them), its number of processes and, for a
    SCAN run, the view it mined its neighbours on (`neighbours_mined_on`), and that run's own origin if it had one
    (SCAN's self-labelling starts from a SCAN run that started from an embedding). Tables compare runs' settings
    with it, so runs from different first stages are not averaged as seeds, and mark a run whose first stage was
    trained by changed code (`trained_by`, the git states of its starts)."""
    method_state = state.get("method_state") if isinstance(state.get("method_state"), dict) else {}
    info = state.get("data_info") or {}
    origin = {"checkpoint": str(Path(path).resolve()), "method": state.get("method"), "epoch": state.get("epoch"),
              "step": state.get("step", 0), "args": state.get("args"), "precision": state.get("precision"),
              "world_size": state.get("world_size"), "resume_changes": state.get("resume_changes"),
              "trained_by": starts_of(Path(path).parent, state),
              "training_set": {"images": info.get("num_samples"), "fingerprint": info.get("fingerprint")},
              "pretrained_from": method_state.get("pretrained_from")}
    # (a scan checkpoint written before it kept the view of a --mining_crop: that crop's)
    asked = (state.get("args") or {}).get("mining_crop") if state.get("method") == "scan" else None
    mined_on = (EvalView(*method_state["mining_view"]) if method_state.get("mining_view") is not None
                else EvalView.of(asked) if asked else None)
    if mined_on is not None:
        origin["neighbours_mined_on"] = dataclasses.asdict(mined_on)
    return origin


def pretrained_normalisation(state: dict) -> tuple[list, list]:
    """The mean and std a checkpoint's run normalised with (`read_pretrained`'s state), so both stages see the same
    inputs."""
    info = state["data_info"]
    return list(info["mean"]), list(info["std"])
