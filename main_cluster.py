#!/usr/bin/env python
"""Train class-assignment heads (SeLa, Self-Classifier, EmbedUL), from scratch or from a pre-trained run.

    python main_cluster.py --config configs/sela_cifar10_resnet.yaml
    python main_cluster.py --config configs/embedul_cifar10.yaml --pretrained runs/superand_cifar10

The run directory works as main_pretrain.py's does (config.yaml, train_log.jsonl, checkpoint.pth, resume); its
heads are scored by `eval_cluster.py --run RUN`. `--pretrained` fills the backbone (EmbedUL: the whole encoder)
from another run's checkpoint before training; a run that resumes ignores it.
"""
from __future__ import annotations

from pathlib import Path

from clusterlab import config, data, distributed, engine
from clusterlab.errors import run_cli
from clusterlab.methods import METHODS, DataInfo
from clusterlab.methods.base import add_training_args
from clusterlab.methods.cluster_base import pretrained_normalisation

CLUSTER_METHODS = sorted(name for name, cls in METHODS.items() if cls.stage == "cluster")


def get_args_parser():
    parser = config.new_parser(__doc__.splitlines()[0], prog="main_cluster.py")
    parser.add_argument("--method", choices=CLUSTER_METHODS, default="sela",
                        help="method; `--method NAME --help` lists its own flags")
    parser.add_argument("--pretrained", default=None, help="run directory or checkpoint to start the backbone from")
    add_training_args(parser)
    return parser


def add_method_args(parser, known: dict) -> None:
    method = known.get("method", parser.get_default("method"))
    if method in CLUSTER_METHODS:
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
    if args.pretrained and not args.mean:
        # both stages must normalise alike (STL-10's statistics differ between train+unlabeled and train)
        args.mean, args.std = pretrained_normalisation(args.pretrained)
    method = METHODS[args.method](args, DataInfo.of(train_set, args.mean, args.std), ctx.device)
    if args.pretrained and not (Path(args.output_dir) / "checkpoint.pth").exists():
        source = method.load_pretrained(args.pretrained)
        if ctx.is_main:
            print(f"{', '.join(method.pretrained_parts)} from {source}", flush=True)
    method.to(ctx.device)
    trainer, start_epoch, start_step = engine.start_run(method, args, ctx, train_set, "cluster", "main_cluster.py")

    for epoch in range(start_epoch, args.epochs):
        trainer.train_one_epoch(epoch, start_step)
        start_step = 0
        trainer.end_of_epoch(epoch)
    trainer.finish()
    distributed.shutdown()


if __name__ == "__main__":
    run_cli(main)
