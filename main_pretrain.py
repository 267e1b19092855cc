#!/usr/bin/env python
"""Pre-train an embedding with one of the self-supervised methods, into a run directory.

    python main_pretrain.py --config configs/swav_digits.yaml [--any_flag value ...]

The run directory (--output_dir) receives config.yaml, train_log.jsonl, checkpoint.pth (every epoch) and
checkpoint_epNNNN.pth (the epochs of --checkpoint_epochs). Started again with the same directory, the run resumes
where it stopped. Distributed: start it with torchrun, srun or launch.py; see README.
"""
from __future__ import annotations

from clusterlab import config, data, distributed, engine
from clusterlab.errors import run_cli
from clusterlab.methods import METHODS, DataInfo
from clusterlab.methods.base import add_training_args


PRETRAIN_METHODS = sorted(name for name, cls in METHODS.items() if cls.stage == "pretrain")


def get_args_parser():
    parser = config.new_parser(__doc__.splitlines()[0], prog="main_pretrain.py")
    parser.add_argument("--method", choices=PRETRAIN_METHODS, default="swav",
                        help="method; `--method NAME --help` lists its own flags")
    add_training_args(parser)
    return parser


def add_method_args(parser, known: dict) -> None:
    """The flags of the method `known` names (the first look at the command line and YAML file decides)."""
    method = known.get("method", parser.get_default("method"))
    if method in PRETRAIN_METHODS:
        METHODS[method].add_args(parser)


def parse_args(argv=None):
    args = config.parse(get_args_parser(), argv, extend=add_method_args)
    args.output_dir = args.output_dir or f"runs/{args.method}_{args.dataset}"
    return args


def main(argv=None):
    args = parse_args(argv)
    engine.configure_threads()
    ctx = distributed.init(args.device)
    engine.seed_everything(args.seed)

    train_set = data.load(args.dataset, args.train_split, args.data_path, args.download)
    method = METHODS[args.method](args, DataInfo.of(train_set, args.mean, args.std), ctx.device).to(ctx.device)
    trainer, start_epoch, start_step = engine.start_run(method, args, ctx, train_set, "pretrain", "main_pretrain.py")

    for epoch in range(start_epoch, args.epochs):
        trainer.train_one_epoch(epoch, start_step)
        start_step = 0
        trainer.end_of_epoch(epoch)
    trainer.finish()
    distributed.shutdown()


if __name__ == "__main__":
    run_cli(main)
