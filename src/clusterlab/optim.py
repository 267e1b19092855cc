"""Optimisers and learning-rate schedules: SGD, our LARS, Adam (SCAN), and per-iteration warm-up + cosine or step
schedules."""
from __future__ import annotations

import math

import torch

from .errors import ConfigError


class LARS(torch.optim.Optimizer):
    """SGD with layer-wise adaptive rate scaling, as apex's LARC with clip=False (You et al., arXiv:1708.03888).

    For every parameter w with gradient g whose norms ||w|| and ||g|| are both non-zero:
    local_lr = eta * ||w|| / (||g|| + wd * ||w|| + eps) and g <- (g + wd * w) * local_lr; where either norm is 0,
    g is left as it is (no decay either, as apex). Then SGD with momentum: v <- m v + g, w <- w - lr v.
    SwAV applies it to every parameter, biases and BN included; `exclude_bias_and_norm` keeps 1-D parameters
    out of the adaptation and the decay.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, eps: float = 1e-8, exclude_bias_and_norm: bool = False):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
                        eps=eps, exclude_bias_and_norm=exclude_bias_and_norm)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            with_grad = [p for p in group["params"] if p.grad is not None]
            # Multi-tensor (foreach) operators, one set per device and dtype: on a GPU 23 operator calls a step
            # over a ResNet-50's 161 tensors, where a loop over them made 2,578 (bench/ops_speed.py). One of them
            # scales each tensor by its own 0-dimensional factor, which PyTorch's CUDA foreach kernels take one
            # tensor at a time (their fused path needs equal shapes; factors as Python numbers would wait for the
            # GPU every step).
            for params in _batches(with_grad):
                self._step_tensors(params, group)
        return loss

    def _step_tensors(self, params: list[torch.Tensor], group: dict) -> None:
        updates = [p.grad for p in params]
        adapted = [i for i, p in enumerate(params) if not (group["exclude_bias_and_norm"] and p.ndim == 1)]
        if adapted:
            scaled = _lars_gradients([params[i] for i in adapted], [updates[i] for i in adapted],
                                     group["weight_decay"], group["trust_coefficient"], group["eps"])
            for i, update in zip(adapted, scaled):
                updates[i] = update
        if group["momentum"]:
            for p, update in zip(params, updates):
                if "momentum_buffer" not in self.state[p]:  # zero, so that the first step gives v = g exactly
                    self.state[p]["momentum_buffer"] = torch.zeros_like(update)
            buffers = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_add_(buffers, updates)
            updates = buffers
        torch._foreach_add_(params, updates, alpha=-group["lr"])


def _lars_gradients(params, grads, weight_decay: float, trust: float, eps: float) -> list[torch.Tensor]:
    """(g + wd * w) * local_lr for every parameter whose norms are both non-zero, g itself for the others; new tensors
    (the gradients are left as they are). One expression for all: where ||w|| = 0, w is zero and the factor 1 leaves
    g; where ||g|| = 0, g is zero and the factor 0 gives it back (as apex LARC: no decay without a gradient). The one
    difference from apex: a gradient whose norm underflows to 0 (float32 values below about 1e-19) becomes 0 here,
    where apex leaves it; its step would be below 1e-19 x lr."""
    param_norms, grad_norms = torch.stack(torch._foreach_norm(params)), torch.stack(torch._foreach_norm(grads))
    local_lr = trust * param_norms / (grad_norms + weight_decay * param_norms + eps)
    adapt = (param_norms > 0) & (grad_norms > 0)
    scale = torch.where(adapt, local_lr, (grad_norms != 0).to(local_lr.dtype))
    updates = torch._foreach_add(grads, params, alpha=weight_decay)
    torch._foreach_mul_(updates, scale.unbind())
    return updates


# On the CPU, tensors of about 4 MB at a time: the updates of the whole set (100 MB for a ResNet-50) would leave the
# cache between the passes over them; operator calls cost little there. On a GPU, all of them at once.
CPU_BATCH_ELEMENTS = 1 << 20


def _batches(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """The tensors in batches for multi-tensor operators: one per device and dtype (split on the CPU)."""
    groups: dict[tuple, list[list[torch.Tensor]]] = {}
    filled: dict[tuple, int] = {}  # elements in each group's last batch
    for t in tensors:
        key = (t.device, t.dtype)
        batches = groups.setdefault(key, [[]])
        if t.device.type == "cpu" and filled.get(key, 0) >= CPU_BATCH_ELEMENTS:
            batches.append([])
            filled[key] = 0
        batches[-1].append(t)
        filled[key] = filled.get(key, 0) + t.numel()
    return [batch for batches in groups.values() for batch in batches]


def unread_flags(args) -> dict[str, str]:
    """The optimisation flags that the optimiser and schedule `args` asks for do not read, each with what reads it
    (build_optimizer and Schedule below are the readers). Not --schedule_period: Super-AND's rounds set it whatever
    the schedule; nor --no_decay_bias_norm, which shapes the optimiser's parameter groups (its checkpoint's state)
    even where no weight decay makes them learn differently."""
    lars, step = args.optimizer == "lars", args.schedule == "step"
    readers = {
        "lars_trust": ("--optimizer lars", lars),
        "lars_exclude_bias_norm": ("--optimizer lars", lars),
        "momentum": ("--optimizer sgd or lars (Adam runs with torch's default betas)", args.optimizer != "adam"),
        "lr_drops": ("--schedule step", step),
        "lr_gamma": ("--schedule step with --lr_drops", step and bool(args.lr_drops)),
        "final_lr": ("--schedule cosine", args.schedule == "cosine"),
        "start_warmup": ("a warm-up (--warmup_epochs above 0)", args.warmup_epochs > 0),
    }
    return {flag: reader for flag, (reader, read) in readers.items() if not read}


def refuse_unread_flags(args, defaults, program: str) -> None:
    """Refuse a flag of `unread_flags` given a value other than its default in `defaults` (a parser holding the
    program's and the method's own defaults: NPID's drops under --schedule cosine were not asked for). Such a flag
    trains what the command without it trains, under a name and a record of its own: a table row per flag with
    the same numbers. `program` names the job in the message ("run", "probe")."""
    def shown(value) -> str:
        return " ".join(map(str, value)) if isinstance(value, list) else str(value).lower() \
            if isinstance(value, bool) else str(value)

    for flag, reader in unread_flags(args).items():
        value, default = getattr(args, flag), defaults.get_default(flag)
        # (no drops at all is what a schedule without drops has: the way to clear a config file's)
        if value != default and value != []:
            raise ConfigError(f"--{flag} {shown(value)} does nothing in this {program}: it applies to {reader}; "
                              f"leave it out (one a config file gives: pass --{flag} {shown(default)})")


def build_optimizer(params, args) -> torch.optim.Optimizer:
    if args.nesterov and args.optimizer != "sgd":
        raise ConfigError(f"--nesterov true (given, or the method's default) applies to --optimizer sgd only (this "
                          f"command has --optimizer {args.optimizer}, which has no Nesterov momentum): pass "
                          f"--nesterov false, or --optimizer sgd")
    if args.nesterov and not args.momentum:
        raise ConfigError("--nesterov true (given, or the method's default) needs a momentum: pass --nesterov false "
                          "with --momentum 0, or a --momentum above 0")
    if args.optimizer == "lars":
        return LARS(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                    trust_coefficient=args.lars_trust, exclude_bias_and_norm=args.lars_exclude_bias_norm)
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                               nesterov=args.nesterov)
    if args.optimizer == "adam":
        # torch's Adam with its default betas and eps, as SCAN's code calls it; weight decay is the L2 term it adds
        # to the gradient (not AdamW's decoupled decay)
        return torch.optim.Adam(params, lr=args.lr, weight_decay=args.weight_decay)
    raise ConfigError(f"unknown --optimizer {args.optimizer!r} (choose one of: sgd, lars, adam)")


class Schedule:
    """Learning rate of every iteration.

    cosine (SwAV's main_swav.py lines 178-182, facebookresearch/swav@06b1b7c): linear warm-up from `start_warmup`
    to `lr` over the first `warmup_epochs * steps_per_epoch` iterations (both ends included), then
    lr_t = final + (lr - final) (1 + cos(pi t / T)) / 2 over the remaining T iterations.
    step (NPID, Super-AND, EmbedUL): lr * gamma^(number of `drops` <= epoch).
    constant: lr. `period` > 0 restarts the schedule every `period` epochs (Super-AND's rounds).
    """

    def __init__(self, kind: str, lr: float, epochs: int, steps_per_epoch: int, final_lr: float = 0.0,
                 warmup_epochs: float = 0, start_warmup: float = 0.0, drops=(), gamma: float = 0.1,
                 period: int = 0):
        if kind not in ("cosine", "step", "constant"):
            raise ConfigError(f"unknown --schedule {kind!r} (choose one of: cosine, step, constant)")
        self.kind, self.lr, self.final_lr, self.steps_per_epoch = kind, lr, final_lr, steps_per_epoch
        self.span = period if period > 0 else epochs
        self.warmup_steps = int(round(warmup_epochs * steps_per_epoch))
        self.start_warmup, self.drops, self.gamma = start_warmup, sorted(drops), gamma

    def __call__(self, global_step: int) -> float:
        total = self.span * self.steps_per_epoch
        t = global_step % total if total else global_step
        if t < self.warmup_steps:
            if self.warmup_steps == 1:
                return self.start_warmup
            return self.start_warmup + (self.lr - self.start_warmup) * t / (self.warmup_steps - 1)
        if self.kind == "cosine":
            length = max(1, total - self.warmup_steps)
            progress = (t - self.warmup_steps) / length
            return self.final_lr + 0.5 * (self.lr - self.final_lr) * (1 + math.cos(math.pi * progress))
        if self.kind == "step":
            epoch = t // self.steps_per_epoch
            return self.lr * self.gamma ** sum(1 for d in self.drops if epoch >= d)
        return self.lr


def build_schedule(args, steps_per_epoch: int) -> Schedule:
    return Schedule(args.schedule, args.lr, args.epochs, steps_per_epoch, final_lr=args.final_lr,
                    warmup_epochs=args.warmup_epochs, start_warmup=args.start_warmup, drops=args.lr_drops,
                    gamma=args.lr_gamma, period=args.schedule_period)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
