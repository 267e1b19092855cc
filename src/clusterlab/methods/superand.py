"""Super-AND, stage 1 (Han, Xu, Park, Cha and Li, "A Comprehensive Approach to Unsupervised Embedding Learning
based on AND Algorithm", arXiv:2002.12158, 2020; upstream code super-AND/super-AND@5a0e5ca main.py,
lib/non_parametric_classifier.py, lib/ans_discovery.py, lib/criterion.py): NPID's non-parametric classifier (NPC)
on a memory bank, trained in rounds that turn more and more confident samples into anchors of small neighbourhoods.

Per step each image gives two views; the 2B embeddings f (Sobel two-stream ResNet -> Linear -> L2 normalisation)
are scored against the bank, O = f M^T / T (T = --bank_t), and
    L = L_AND(O) + L_AUG + w(t) L_UE(O),   w(t) = ue_weight * floor(epoch_in_round / ue_every)
(losses/superand.py). Round 0 is plain instance discrimination. Before round r >= 1 the int(N * ans_select_rate * r)
memory entries whose row softmax(M_i M^T / T) has the lowest entropy become anchors, each with its ans_size
most similar other entries as neighbours (ops/knn.py, ties to the lower index). The learning-rate schedule
restarts every round (--schedule_period = --epochs_per_round), with the same optimiser state, as upstream.

L_AUG compares the two views of each image against the whole global batch. By default (`--aug_on logits`, as
upstream) it works on the L2-normalised NPC logit rows x_i = O_i / |O_i|, which have N entries. Their products need
only the bank's d x d Gram matrix G = M^T M, recomputed every step:
    O_i . O_j = f_i G f_j / T^2,   |O_i| = sqrt(f_i G f_i) / T,
so neither the 2B x N rows' norms nor their product with the bank are formed, and only f_j / |O_j| (d numbers per
column) crosses ranks. `--aug_on embedding` uses the 128-d f instead.

Resume: the round, the anchors and their neighbours are method state, so a run stopped anywhere in a round resumes
with the same anchors (upstream's resume restarts at round 0). Anchors are found again only when an epoch starts a
round that the state has not reached yet.

The labels of the batches are recorded (a buffer, -1 until a sample is seen) only to log how often an anchor and
its neighbour share a label ("ans_consistency", upstream's cheat labels); no loss uses them.
"""
from __future__ import annotations

import argparse
import math

import torch

from .. import distributed
from ..config import bool_flag, epoch_count, fraction, non_negative_float, positive_float, positive_int
from ..errors import ConfigError
from ..losses.superand import and_loss, aug_loss, ue_loss
from ..ops import CHUNK_ELEMENTS
from ..ops.knn import neighbour_label_agreement, query_chunks, topk_neighbours
from .base import Batch, DataInfo, Progress, two_view_columns
from .memory_bank_base import MemoryBankMethod, add_memory_args


class SuperAND(MemoryBankMethod):
    name = "superand"
    index_copies = 2  # both views of every image update the bank (`own` in forward)

    @staticmethod
    def add_args(parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("superand")
        add_memory_args(group, "npc")
        group.add_argument("--batch_t", type=positive_float, default=0.1, help="temperature of the AUG loss")
        group.add_argument("--aug_on", choices=["logits", "embedding"], default="logits",
                           help="AUG loss on the L2-normalised NPC logit rows (upstream) or on the embeddings")
        group.add_argument("--rounds", type=positive_int, default=5, help="rounds, round 0 without anchors")
        group.add_argument("--epochs_per_round", type=epoch_count, default=200)
        group.add_argument("--ans_select_rate", type=fraction, default=0.25,
                           help="fraction of the samples added to the anchors at each round")
        group.add_argument("--ans_size", type=positive_int, default=1, help="neighbours per anchor")
        group.add_argument("--ue_weight", type=non_negative_float, default=0.2,
                           help="UE loss weight added every --ue_every epochs of a round")
        group.add_argument("--ue_every", type=positive_int, default=80, help="epochs of a round per UE weight step")
        group.add_argument("--ue_mask_own", type=bool_flag, default=True,
                           help="set each row's own logit to -10 before the UE entropy, as the paper and upstream's "
                                "code (5a0e5ca) do; false: the unmasked entropy of super-AND's first commit "
                                "(05ce30f), removed in eab79e5")
        parser.set_defaults(arch="resnet18_sobel", optimizer="sgd", nesterov=True, lr=0.03, momentum=0.9,
                            weight_decay=5e-4, schedule="step", lr_drops=[120, 160], lr_gamma=0.1,
                            schedule_period=200, warmup_epochs=0, epochs=1000, batch_size=128, nmb_crops=[2],
                            size_crops=[0], min_scale_crops=[0.2], max_scale_crops=[1.0], brightness=0.4,
                            contrast=0.4, saturation=0.4, hue=0.4, jitter_p=1.0, grey_p=0.2, blur_p=0.0, flip_p=0.5,
                            init="default")

    def __init__(self, args: argparse.Namespace, info: DataInfo, device: torch.device):
        if args.epochs != args.rounds * args.epochs_per_round:
            raise ConfigError(f"--epochs {args.epochs} must equal --rounds {args.rounds} x --epochs_per_round "
                              f"{args.epochs_per_round} = {args.rounds * args.epochs_per_round}")
        if args.schedule_period != args.epochs_per_round:
            raise ConfigError(f"--schedule_period {args.schedule_period} must equal --epochs_per_round "
                              f"{args.epochs_per_round} (the schedule restarts every round)")
        if list(args.nmb_crops) != [2]:
            raise ConfigError(f"superand trains on two views of the same size: --nmb_crops {args.nmb_crops} "
                              f"must be [2]")
        if args.ans_size >= info.num_samples:
            raise ConfigError(f"--ans_size {args.ans_size} must be below the number of training samples "
                              f"({info.num_samples})")
        super().__init__(args, info, device)
        n = info.num_samples
        self.round = 0
        self.anchors = torch.zeros(0, dtype=torch.long, device=device)
        # neighbours[i]: sample i's neighbours when it is an anchor, else -1 (what and_loss reads per row).
        self.register_buffer("neighbours", torch.full((n, args.ans_size), -1, dtype=torch.long, device=device),
                             persistent=False)
        self.register_buffer("seen_labels", torch.full((n,), -1, dtype=torch.long, device=device))
        self.consistency = float("nan")
        self.pending_labels: torch.Tensor | None = None

    # ---- rounds ----
    def on_epoch_start(self, epoch: int) -> None:
        current = epoch // self.args.epochs_per_round
        if current > self.round:
            self.start_round(current)

    @torch.no_grad()
    def start_round(self, number: int) -> None:
        """Collective: anchors and neighbours for round `number` from the bank as it is now."""
        args, bank = self.args, self.memory.weight
        count = min(bank.shape[0], int(bank.shape[0] * args.ans_select_rate * number))
        # A row no step has written is random, nearly orthogonal to the rest: its softmax is peaked and its entropy
        # among the lowest. It comes last instead.
        entropy = bank_entropy(bank, args.bank_t).masked_fill(~self.memory.written, float("inf"))
        anchors = select_anchors(entropy, count)
        neighbours = topk_neighbours(bank[anchors], bank, args.ans_size, exclude=anchors, split_over_ranks=True)
        self.set_anchors(number, anchors, neighbours.indices)
        if distributed.rank() == 0:
            print(f"superand round {number}: {count} anchors, label consistency with their neighbours "
                  f"{self.consistency:.4f}", flush=True)

    def set_anchors(self, number: int, anchors: torch.Tensor, neighbours: torch.Tensor) -> None:
        self.round, self.anchors = number, anchors.to(self.neighbours.device)
        self.neighbours.fill_(-1)
        self.neighbours[self.anchors] = neighbours.to(self.neighbours.device)
        labels = self.seen_labels
        self.consistency = neighbour_label_agreement(labels[self.anchors], labels[self.neighbours[self.anchors]])

    # ---- training ----
    def forward(self, crops, batch: Batch, progress: Progress):
        args, n = self.args, batch.indices.shape[0]
        f = self.embedding(torch.cat(crops))
        own = batch.indices.repeat(2)
        weight = args.ue_weight * ((progress.epoch % args.epochs_per_round) // args.ue_every)
        with torch.autocast(self.device.type, enabled=False):
            logits = (f / args.bank_t) @ self.memory.weight.t()
            l_and = and_loss(logits, own, self.neighbours[own])
            l_aug = aug_loss(self.batch_similarities(f), *two_view_columns(n, f.device), args.batch_t)
            # At weight 0 (the first ue_every epochs of every round) UE is only logged: no graph, no backward.
            with torch.set_grad_enabled(weight > 0 and torch.is_grad_enabled()):
                l_ue = ue_loss(logits, own if args.ue_mask_own else None)
        self.remember(own, f)
        self.pending_labels = batch.labels
        terms = {"and": l_and.detach(), "aug": l_aug.detach(), "ue": l_ue.detach(), "ue_weight": weight,
                 "round": self.round}
        if self.round > 0 and not math.isnan(self.consistency):  # nan: no anchor with a known label yet
            terms["ans_consistency"] = self.consistency
        return l_and + l_aug + weight * l_ue, terms

    def batch_similarities(self, f: torch.Tensor) -> torch.Tensor:
        """x_i . x_j of this rank's rows against every view of the global batch (columns detached, rank order)."""
        if self.args.aug_on == "embedding":
            return f @ distributed.all_gather_cat(f.detach()).t()
        # O_i . O_j = f_i G f_j / T^2 with the bank's d x d Gram matrix G = M^T M: no N-wide row is needed. G costs
        # N d^2 per step against the 2 R N d of the rows' product with the bank and its backward: less while a
        # rank's 2B rows number more than d / 2 (the recipes on one process: 256 rows, d 128).
        bank, t = self.memory.weight, self.args.bank_t
        f_gram = f @ (bank.t() @ bank)
        # f G f is |f M^T|^2 >= 0, but its float32 rounding can go below 0 when f is nearly orthogonal to a
        # collapsed bank; the direct norms never did.
        norms = (f_gram * f).sum(dim=1, keepdim=True).clamp_min(torch.finfo(f.dtype).tiny).sqrt() / t
        keys = distributed.all_gather_cat((f / norms).detach())
        return (f_gram / (t * t * norms)) @ keys.t()

    def after_backward(self, progress: Progress) -> None:
        labels, self.pending_labels = self.pending_labels, None
        indices = self.update_bank()
        # The gathered indices are each rank's [indices; indices], so the labels go in the same layout.
        self.seen_labels[indices] = distributed.all_gather_cat(labels.repeat(2))

    # ---- state ----
    def extra_state(self) -> dict:
        return {"round": self.round, "anchors": self.anchors.cpu(),
                "neighbours": self.neighbours[self.anchors].cpu(),
                "consistency": None if math.isnan(self.consistency) else self.consistency}  # (None: no known label)

    def load_extra_state(self, state: dict) -> None:
        self.set_anchors(int(state["round"]), state["anchors"], state["neighbours"])
        # The round's consistency is measured on the labels seen when it started; set_anchors measured it on those
        # seen by the checkpoint (checkpoints without it keep that).
        if "consistency" in state:
            self.consistency = float("nan") if state["consistency"] is None else float(state["consistency"])


@torch.no_grad()
def bank_entropy(bank: torch.Tensor, temperature: float, chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """H_i = -sum_j p_ij log p_ij with p_i = softmax(M_i M^T / T), j over all N entries (itself included).

    Collective: the rows are taken in chunks of at most `chunk_elements` logits (ops/knn.query_chunks), each rank
    computes a contiguous share of the chunks and the shares are gathered, so every rank gets all N values.
    """
    parts = [bank.new_zeros(0)]
    for rows in query_chunks(bank.shape[0], bank.shape[0], chunk_elements, split_over_ranks=True):
        log_p = torch.log_softmax(bank[rows.start: rows.stop] @ bank.t() / temperature, dim=1)
        parts.append(-(log_p.exp() * log_p).sum(dim=1))
    return distributed.all_gather_uneven(torch.cat(parts))


def select_anchors(entropy: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` entries of lowest entropy, lowest first (ties: the lower index first)."""
    return torch.sort(entropy, stable=True).indices[:count]
