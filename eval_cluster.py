#!/usr/bin/env python
"""Clustering quality of a run: k-means on its features (any K: over-clustering), scored with ACC, NMI, AMI, ARI.

    python eval_cluster.py --run runs/swav_digits [--clusters 10 20]
    python eval_cluster.py --baseline pixels --dataset digits --output_dir runs/pixels_digits

k-means (k-means++, --restarts) is fitted on the train split's features and assigns the test split, which is
scored; with more clusters than classes each cluster maps to its majority class. Datasets with superclasses
(cifar100) get a second, superclass record. Writes one record per K (eval "cluster") to RUN/metrics.jsonl and a
confusion-matrix PNG beside it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from clusterlab import cli, config, data, distributed, engine, results
from clusterlab.config import bool_flag
from clusterlab.errors import ConfigError, run_cli
from clusterlab.eval.features import open_evaluation, pixels
from clusterlab.eval.kmeans import kmeans_assign
from clusterlab.eval.metrics import cluster_mapping, cluster_metrics, superclass_metrics
from clusterlab.eval.plots import confusion_png


def get_args_parser():
    parser = config.new_parser(__doc__.splitlines()[0], prog="eval_cluster.py")
    cli.add_eval_args(parser)
    parser.add_argument("--baseline", choices=["pixels"], default=None,
                        help="evaluate raw pixels instead of a run (needs --dataset and --output_dir)")
    parser.add_argument("--output_dir", default=None, help="where the baseline's record goes")
    parser.add_argument("--clusters", type=config.positive_int, nargs="*", default=[],
                        help="numbers of clusters (default: the number of classes)")
    parser.add_argument("--fit_on", choices=["train", "test"], default="train", help="split k-means is fitted on")
    parser.add_argument("--restarts", type=config.positive_int, default=10, help="k-means++ restarts")
    parser.add_argument("--normalize", type=bool_flag, default=True, help="L2-normalise features (not pixels)")
    parser.add_argument("--seed", type=int, default=0, help="k-means seed")
    parser.add_argument("--plot", type=bool_flag, default=True, help="write confusion-matrix PNGs")
    return parser


def main(argv=None):
    args = config.parse(get_args_parser(), argv)
    engine.configure_threads()
    ctx = distributed.init(args.device)
    if not args.baseline and not args.normalize:
        raise ConfigError("--normalize false is only meaningful for --baseline pixels here")
    if args.baseline:
        run_dir, run_args, epoch, checkpoint_name, train_set, test_set, train_x, test_x = pixel_inputs(args)
        feature_kind = "pixels"
    else:
        evaluation = open_evaluation(args, ctx.device)
        loaded = evaluation.loaded
        run_dir, run_args, epoch, checkpoint_name = loaded.run_dir, loaded.args, loaded.epoch, loaded.checkpoint_name
        train_set, test_set = evaluation.train_set, evaluation.test_set
        train_x = evaluation.features(train_set, args.features, ctx.device, args.batch_size, args.workers)
        test_x = evaluation.features(test_set, args.features, ctx.device, args.batch_size, args.workers)
        feature_kind = args.features
    fit_x = train_x if args.fit_on == "train" else test_x
    too_many = [k for k in args.clusters if k > len(fit_x)]
    if too_many:
        raise ConfigError(f"--clusters {too_many[0]} is more than the {len(fit_x)} images of the {args.fit_on} split "
                          f"k-means is fitted on (use at most {len(fit_x)})")
    if ctx.is_main:
        for clusters in args.clusters or [test_set.num_classes]:
            predicted = kmeans_assign(fit_x, test_x, clusters, args.restarts, args.seed)
            report(args, run_dir, run_args, epoch, checkpoint_name, test_set, predicted, clusters, feature_kind)
    distributed.shutdown()


def pixel_inputs(args):
    if not args.dataset or not args.output_dir:
        raise ConfigError("--baseline pixels needs --dataset NAME and --output_dir DIR")
    train_set = data.load(args.dataset, "train", args.data_path, args.download)
    test_set = data.load(args.dataset, "test", args.data_path, args.download)
    run_args = argparse.Namespace(method="pixels", dataset=args.dataset, arch=None, width=None, seed=args.seed)
    return (Path(args.output_dir), run_args, None, None, train_set, test_set, pixels(train_set), pixels(test_set))


def report(args, run_dir, run_args, epoch, checkpoint_name, test_set, predicted, clusters, feature_kind):
    truth = test_set.labels.numpy()
    _, mapping_kind = cluster_mapping(truth, predicted, clusters, test_set.num_classes)
    views = [("classes", cluster_metrics(truth, predicted, clusters, test_set.num_classes), False)]
    if test_set.superclass_labels is not None:
        views.append(("superclasses", superclass_metrics(truth, test_set.superclass_labels.numpy(), predicted,
                                                         clusters, test_set.num_classes), True))
    for label, metrics, superclass in views:
        protocol = {"assignment": "kmeans", "fit_on": args.fit_on, "clusters": clusters, "features": feature_kind,
                    "normalize": args.normalize and feature_kind != "pixels", "restarts": args.restarts,
                    "mapping": mapping_kind, "selection": "last", "superclass": superclass}
        record = results.make_record(run_args, eval_kind="cluster", protocol=protocol, metrics=metrics, epoch=epoch,
                                     checkpoint_name=checkpoint_name, run=Path(run_dir).name)
        record["dataset"] = test_set.name
        results.append_record(run_dir, record)
        print(f"k-means K={clusters} ({feature_kind}, fit on {args.fit_on}) on {test_set.name} test {label}: "
              f"ACC {metrics['acc']:.4f} NMI {metrics['nmi']:.4f} AMI {metrics['ami']:.4f} ARI {metrics['ari']:.4f}"
              f"  [{run_dir}]")
    if args.plot:
        confusion_png(truth, predicted, test_set.class_names, Path(run_dir) / f"confusion_kmeans_k{clusters}.png",
                      f"{run_args.method} on {test_set.name}: k-means K={clusters}, ACC {views[0][1]['acc']:.3f}")


if __name__ == "__main__":
    run_cli(main)
