#!/usr/bin/env python
"""Weighted kNN accuracy of a run's features: train split as the labelled memory, test split as queries.

    python eval_knn.py --run runs/swav_digits [--k 200 --temperature 0.1 --features backbone]

Appends one record (eval "knn", metrics top1 / top5) to RUN/metrics.jsonl.
"""
from __future__ import annotations

from clusterlab import cli, config, distributed, engine, results
from clusterlab.errors import run_cli
from clusterlab.eval.features import open_evaluation
from clusterlab.eval.knn import knn_accuracy


def get_args_parser():
    parser = config.new_parser(__doc__.splitlines()[0], prog="eval_knn.py")
    cli.add_eval_args(parser)
    parser.add_argument("--k", type=config.positive_int, default=200, help="neighbours that vote")
    parser.add_argument("--temperature", type=config.positive_float, default=0.1,
                        help="vote weight exp(similarity / T)")
    return parser


def main(argv=None):
    args = config.parse(get_args_parser(), argv)
    engine.configure_threads()
    ctx = distributed.init(args.device)
    evaluation = open_evaluation(args, ctx.device)
    train_x = evaluation.features(evaluation.train_set, args.features, ctx.device, args.batch_size, args.workers)
    test_x = evaluation.features(evaluation.test_set, args.features, ctx.device, args.batch_size, args.workers)
    train_y = evaluation.train_set.labels.to(ctx.device)
    metrics = knn_accuracy(train_x, train_y, test_x, evaluation.test_set.labels, evaluation.test_set.num_classes,
                           args.k, args.temperature)
    loaded = evaluation.loaded
    if ctx.is_main:
        protocol = {"k": args.k, "temperature": args.temperature, "features": args.features,
                    "train_features": "recomputed", "fit_on": "train", "selection": "last"}
        record = results.make_record(loaded.args, eval_kind="knn", protocol=protocol, metrics=metrics,
                                     epoch=loaded.epoch, checkpoint_name=loaded.checkpoint_name,
                                     run=loaded.run_dir.name)
        record["dataset"] = evaluation.test_set.name
        results.append_record(loaded.run_dir, record)
        print(f"kNN (k={args.k}, T={args.temperature}, {args.features}) on {evaluation.test_set.name} test: "
              f"top1 {metrics['top1']:.4f} top5 {metrics['top5']:.4f}  [{loaded.run_dir}, epoch {loaded.epoch}]")
    distributed.shutdown()


if __name__ == "__main__":
    run_cli(main)
