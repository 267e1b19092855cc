#!/usr/bin/env python
"""Weighted kNN accuracy of a run's features: train split as the labelled memory, test split as queries.

    python eval_knn.py --run runs/swav_digits [--k 200 --temperature 0.1 --features backbone]

Appends one record (eval "knn", metrics top1 / top5) to RUN/metrics.jsonl. `--train_features memory_bank` uses a
memory-bank method's bank as the labelled memory instead of recomputed features (upstream NPID / Super-AND).
"""
from __future__ import annotations

from pathlib import Path

import torch

from clusterlab import cli, config, distributed, engine, results
from clusterlab.errors import ConfigError, run_cli
from clusterlab.eval.features import open_evaluation
from clusterlab.eval.knn import knn_accuracy


def get_args_parser():
    parser = config.new_parser(__doc__.splitlines()[0], prog="eval_knn.py")
    cli.add_eval_args(parser)
    parser.add_argument("--k", type=config.positive_int, default=200, help="neighbours that vote")
    parser.add_argument("--train_features", choices=["recomputed", "memory_bank"], default="recomputed",
                        help="train features recomputed with the test view (ours), or the method's memory bank "
                             "(upstream's NPID / Super-AND monitor)")
    parser.add_argument("--temperature", type=config.positive_float, default=0.1,
                        help="vote weight exp(similarity / T)")
    return parser


def main(argv=None):
    args = config.parse(get_args_parser(), argv)
    engine.configure_threads()
    engine.exit_on_stop_signals()
    protocol = {"k": args.k, "temperature": args.temperature, "features": args.features,
                "train_features": args.train_features, "fit_on": "train", "selection": "last"}
    if args.skip_recorded and args.run and results.has_record(args.run, "knn", Path(args.checkpoint or
                                                                                     "checkpoint.pth").name, protocol):
        print(f"kNN with this protocol already recorded for {args.run}; skipped")
        return
    if args.train_features == "memory_bank" and args.features != "embedding":
        raise ConfigError("--train_features memory_bank needs --features embedding (the bank holds embeddings)")
    ctx = distributed.init(args.device)
    evaluation = open_evaluation(args, ctx.device)
    loaded = evaluation.loaded
    test_x = evaluation.features(evaluation.test_set, args.features, ctx.device, args.batch_size, args.workers)
    train_y = evaluation.train_set.labels.to(ctx.device)
    if args.train_features == "memory_bank":
        train_x = memory_bank_features(loaded, len(evaluation.train_set)).to(ctx.device)
    else:
        train_x = evaluation.features(evaluation.train_set, args.features, ctx.device, args.batch_size, args.workers)
    metrics = knn_accuracy(train_x, train_y, test_x, evaluation.test_set.labels, evaluation.test_set.num_classes,
                           args.k, args.temperature)
    if ctx.is_main:
        record = results.make_record(loaded.args, eval_kind="knn", protocol=protocol, metrics=metrics,
                                     epoch=loaded.epoch, checkpoint_name=loaded.checkpoint_name,
                                     run=loaded.run_dir.name)
        record["dataset"] = evaluation.test_set.name
        results.append_record(loaded.run_dir, record)
        print(f"kNN (k={args.k}, T={args.temperature}, {args.features}, train features {args.train_features}) on "
              f"{evaluation.test_set.name} test: top1 {metrics['top1']:.4f} top5 {metrics['top5']:.4f}  "
              f"[{loaded.run_dir}, epoch {loaded.epoch}]")
    distributed.shutdown()


def memory_bank_features(loaded, train_size: int) -> torch.Tensor:
    """The run's memory bank rows of the labelled train images (upstream's per-epoch kNN monitor reads these)."""
    bank = getattr(loaded.method, "memory_bank", None)
    if bank is None:
        raise ConfigError(f"--train_features memory_bank: method {loaded.args.method!r} keeps no memory bank "
                          f"(use recomputed)")
    bank = torch.as_tensor(bank)
    split = getattr(loaded.args, "train_split", "train")
    if len(bank) != train_size and not split.startswith("train+"):
        raise ConfigError(f"--train_features memory_bank: the bank has {len(bank)} rows, the train split "
                          f"{train_size} images")
    # a bank over train+unlabeled (STL-10) holds the labelled train images first
    return torch.nn.functional.normalize(bank[:train_size].float(), dim=1)


if __name__ == "__main__":
    run_cli(main)
