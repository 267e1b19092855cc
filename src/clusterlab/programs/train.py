"""Train a method into a run directory: main_pretrain.py (embeddings) and main_cluster.py (class assignment).

    python main_pretrain.py --config configs/swav_digits.yaml [--any_flag value ...]
    python main_cluster.py --config configs/embedul_cifar10.yaml --pretrained runs/superand_cifar10

The two programs differ only in the methods they offer (a method's `program_kind`) and in main_cluster.py's
`--pretrained`, which fills the backbone (EmbedUL: the whole encoder) from another run's checkpoint before
training; a run that resumes ignores it. The run directory (--output_dir) receives config.yaml, train_log.jsonl,
status.json, checkpoint.pth (every epoch) and checkpoint_epNNNN.pth (the epochs of --checkpoint_epochs); started
again with the same directory, the run resumes where it stopped. Distributed: torchrun, srun or launch.py (README).
"""
from __future__ import annotations

from pathlib import Path

from .. import checkpoint, config, data, distributed, engine, optim
from ..errors import ConfigError
from ..methods import METHODS, DataInfo
from ..methods.base import add_training_args
from ..methods.cluster_base import pretrained_moved_on, pretrained_normalisation, read_pretrained

PROGRAM = {"pretrain": "main_pretrain.py", "cluster": "main_cluster.py"}
DEFAULT_METHOD = {"pretrain": "swav", "cluster": "sela"}


def methods_of(kind: str) -> list[str]:
    return sorted(name for name, cls in METHODS.items() if cls.program_kind == kind)


def get_args_parser(kind: str):
    description = {"pretrain": "Pre-train an embedding with a self-supervised method, into a run directory.",
                   "cluster": "Train class-assignment heads (SeLa, Self-Classifier, EmbedUL, SCAN), from scratch "
                              "or from a pre-trained run."}[kind]
    parser = config.new_parser(description, prog=PROGRAM[kind])
    # (no argparse choices: add_method_args names the program that trains another program's method)
    parser.add_argument("--method", default=DEFAULT_METHOD[kind],
                        help=f"method, one of {', '.join(methods_of(kind))}; `--method NAME --help` lists its own "
                             f"flags")
    if kind == "cluster":
        parser.add_argument("--pretrained", type=config.path, default=None,
                            help="a run directory that finished training (its checkpoint.pth), or a checkpoint file, "
                                 "to start the backbone from (of images with as many channels as this dataset's)")
    add_training_args(parser)
    return parser


def add_method_args(kind: str, parser, known: dict) -> None:
    """The flags of the method `known` names (the first look at the command line and YAML file decides). A method
    of the other program, or none at all, is named here: the config's keys for that method would otherwise be
    refused one by one as unknown flags."""
    method = known.get("method", parser.get_default("method"))
    if method not in methods_of(kind):
        other = next((program for other, program in PROGRAM.items() if method in methods_of(other)), None)
        trained_by = f"is trained by {other}" if other else "is not a method"
        raise ConfigError(f"--method {method!r} {trained_by}; {PROGRAM[kind]} trains {', '.join(methods_of(kind))}")
    METHODS[method].add_args(parser)
    parser.other_methods_hint = lambda name: other_methods_hint(kind, method, name)


def other_methods_hint(kind: str, method: str, flag: str) -> str | None:
    """Where a flag (or alias) `method` does not take belongs: `--method npid does not take it; swav, unmix do`
    (None when no other method of this program takes it either)."""
    owners = [other for other in methods_of(kind) if other != method
              and flag in config.flag_actions(_method_parser(other))]
    return f"--method {method} does not take it; {', '.join(owners)} {'does' if len(owners) == 1 else 'do'}" \
        if owners else None


def _method_parser(method: str):
    parser = config.new_parser("", prog=method)
    METHODS[method].add_args(parser)
    return parser


def parse_args(kind: str, argv=None):
    parser = get_args_parser(kind)
    args = config.parse(parser, argv, extend=lambda parser, known: add_method_args(kind, parser, known))
    # against the method's own defaults, not a config file's (config.parse made those the parser's defaults)
    from . import PROGRAMS

    optim.refuse_unread_flags(args, PROGRAMS[PROGRAM[kind]].parser({"method": args.method}), "run")
    args.output_dir = args.output_dir or f"runs/{args.method}_{args.dataset}"
    if args.data_path:
        args.data_path = config.absolute_path(args.data_path)
    return args


def _normalisation(args, kind: str, train_set, own: Path, found) -> tuple:
    """The mean and std the run trains with: --mean and --std where given (each on its own). For one not given, a
    run that resumes goes on with its own checkpoint's (an image folder's statistics are computed again at every
    start, by code that may have changed since; the pre-trained run may have moved or changed), and a second stage
    starts with the first stage's (`found`: STL-10's statistics differ between train+unlabeled and train), which
    become its flags, so config.yaml records them. Else (None) the data's own."""
    pretrained = getattr(args, "pretrained", None)
    if (args.mean and args.std) or not (pretrained or own.exists()):
        return args.mean, args.std
    state = found[1] if found else checkpoint.load(own, kind=kind, mmap=True)
    saved = pretrained_normalisation(state)
    if len(saved[0]) != train_set.channels:
        if found:
            raise ConfigError(f"--pretrained {pretrained!r} was trained on images of {len(saved[0])} channel(s), "
                              f"{args.dataset} has {train_set.channels}: start from a run trained on images like "
                              f"these")
        return args.mean, args.std  # resuming on another training set: start_run refuses it by name
    # each of the two given replaces the saved one (a --std alone was dropped, while config.yaml recorded it)
    chosen = (args.mean or saved[0], args.std or saved[1])
    if pretrained:
        args.mean, args.std = chosen
    else:  # a resume goes on with the flags its run recorded (a second stage's are its first stage's statistics):
        # left empty, they read as changed on resume, and the tables made the run a recipe of its own
        recorded = state.get("args") if isinstance(state.get("args"), dict) else {}
        args.mean, args.std = args.mean or list(recorded.get("mean") or []), args.std or list(recorded.get("std") or [])
    return chosen


def main(kind: str, argv=None):
    args = parse_args(kind, argv)
    distributed.configure_threads()
    ctx = distributed.init(args.device, flags=vars(args))
    with engine.owned_run_dir(args.output_dir, ctx) as run:
        engine.seed_everything(args.seed)
        train_set = data.load(args.dataset, args.train_split, args.data_path, args.download)
        pretrained = getattr(args, "pretrained", None)
        own = Path(args.output_dir) / "checkpoint.pth"
        # Read once, for its normalisation and its weights (a resumed run has both in its own checkpoint).
        resuming = own.exists()
        found = read_pretrained(pretrained) if pretrained and not resuming else None
        normalisation = _normalisation(args, kind, train_set, own, found)
        method = METHODS[args.method](args, DataInfo.of(train_set, *normalisation), ctx.device)
        method.check_training_settings()
        if not pretrained and not resuming and getattr(method, "starts_from", None) and ctx.is_main:
            print(f"note: no --pretrained: {args.method} starts from random weights; its recipe starts from "
                  f"{method.starts_from}", flush=True)
        if found is not None:
            source = method.load_pretrained(pretrained, *found)
            found = None  # the pre-trained checkpoint's memory goes before training
            if ctx.is_main:
                print(f"{', '.join(method.pretrained_parts)} from {source}", flush=True)
        method.to(ctx.device)
        trainer, start_epoch, start_step = engine.start_run(method, args, ctx, train_set, kind, PROGRAM[kind], run)
        if pretrained and resuming and ctx.is_main:
            moved_on = pretrained_moved_on(pretrained, getattr(method, "pretrained_from", None))
            if moved_on:
                print(f"note: {moved_on}", flush=True)

        for epoch in range(start_epoch, args.epochs):
            completed = trainer.train_one_epoch(epoch, start_step)
            start_step = 0
            if completed:
                trainer.end_of_epoch(epoch)  # kNN monitor, checkpoint.pth, checkpoint_epNNNN.pth, status.json
            if trainer.requeue_now(epoch, completed):
                trainer.save_and_requeue()   # a pre-emption or time-limit signal: checkpoint here, exit 75
        trainer.finish()
    distributed.shutdown()
