"""Weighted kNN accuracy of a run's features: train split as the labelled memory, test split as queries.

    python eval_knn.py --run runs/swav_digits [--k 20 200 --temperature 0.1 --features backbone]

Appends one record per k (eval "knn", metrics top1 / top5) to RUN/metrics.jsonl; the features and the neighbour
search (for the largest k) are computed once for all of them. `--train_features memory_bank` uses a memory-bank
method's bank as the labelled memory instead of recomputed features (upstream NPID / Super-AND).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .. import cli, config, distributed, results
from ..data.registry import same_images
from ..engine import found_on_every_rank
from ..errors import ConfigError
from ..eval.features import (baseline_view, data_protocol, open_evaluation, open_pixel_baseline, pixels,
                             refuse_missing_embedding, refuse_output_dir_of_a_run, requested_checkpoint_name,
                             requested_record, view_words)
from ..eval.knn import knn_accuracies


def get_args_parser():
    parser = config.new_parser(__doc__.splitlines()[0], prog="eval_knn.py")
    cli.add_eval_args(parser)
    parser.add_argument("--baseline", choices=["pixels"], default=None,
                        help="raw pixels (L2-normalised) instead of a run (needs --dataset and --output_dir)")
    parser.add_argument("--output_dir", type=config.path, default=None, help="where the baseline's record goes")
    parser.add_argument("--k", type=config.positive_int, nargs="+", default=[200],
                        help="neighbours that vote; several values score the same features once each")
    parser.add_argument("--train_features", choices=["recomputed", "memory_bank"], default="recomputed",
                        help="train features recomputed with the test view (ours), or the method's memory bank "
                             "(upstream's NPID / Super-AND monitor, which votes with the run's --bank_t: give that as "
                             "--temperature to reproduce its number, e.g. 0.1 in the CIFAR recipes, 0.07 in "
                             "npid_imagenet.yaml)")
    parser.add_argument("--temperature", type=config.positive_float, default=0.1,
                        help="vote weight exp(similarity / T)")
    return parser


def main(argv=None):
    args = config.parse(get_args_parser(), argv)
    check_flags(args)
    distributed.configure_threads()
    checkpoint_name = requested_checkpoint_name(args.run, args.checkpoint)
    # top5 "voted": a top-5 hit needs a neighbour of the true class (eval/knn.py; records without the key counted
    # unvoted classes too, as upstream does).
    protocols = {k: {"k": k, "temperature": args.temperature, "features": "pixels" if args.baseline else args.features,
                     "train_features": args.train_features, "fit_on": "train", "selection": "last", "top5": "voted"}
                 for k in dict.fromkeys(args.k)}
    wanted = requested_record(args)
    ctx = distributed.init(args.device, flags=vars(args))
    recorded = found_on_every_rank([results.skip_recorded(args, args.run, "knn", checkpoint_name, protocol, wanted)
                                    for protocol in protocols.values()], ctx.device)
    for k, skipped in zip(list(protocols), recorded):
        if skipped:
            if ctx.is_main:
                print(f"kNN with k={k} and this protocol already recorded for {args.run}; skipped")
            del protocols[k]
    if not protocols:
        distributed.shutdown()
        return
    if args.baseline:
        run_dir, run_args, train_set, test_set = open_pixel_baseline(args)
        results.require_writable(run_dir)
        view = baseline_view(args, train_set)
        train_x, test_x = (F.normalize(pixels(s, view, ctx.device, args.workers), dim=1).to(ctx.device)
                           for s in (train_set, test_set))
        train_labels = train_set.labels
        position = checkpoint_name = None
        data_keys = data_protocol(train_set, test_set, view, train_set.image_size)
        view_label = view_words(view, test_set)
    else:
        evaluation = open_evaluation(args, ctx.device)
        loaded = evaluation.loaded
        check_flags(args, type(loaded.method))
        run_dir, run_args, position = loaded.run_dir, loaded.args, loaded.position
        results.require_writable(run_dir)
        checkpoint_name = loaded.checkpoint_name
        train_set, test_set, data_keys = evaluation.train_set, evaluation.test_set, evaluation.data_protocol()
        view_label = evaluation.view_words()
        test_x = evaluation.features(test_set, args.features, ctx.device, args.batch_size, args.workers)
        if args.train_features == "memory_bank":
            train_x, written = memory_bank_features(loaded, train_set)
            if len(written) < len(train_set) and ctx.is_main:
                print(f"note: {len(train_set) - len(written)} of the bank's {len(train_set)} rows were never written "
                      f"(their images were left out of every epoch so far): they do not vote")
            train_x, train_labels = train_x.to(ctx.device), train_set.labels[written]
        else:
            train_x = evaluation.features(train_set, args.features, ctx.device, args.batch_size, args.workers)
            train_labels = train_set.labels
    scores = knn_accuracies(train_x, train_labels.to(ctx.device), test_x, test_set.labels, test_set.num_classes,
                            list(protocols), args.temperature)
    for k, protocol in protocols.items():
        metrics = scores[k]
        if ctx.is_main:
            protocol.update(data_keys)
            if k > len(train_labels):  # every train image votes: the record says so (a recipe's k on a small set)
                protocol["k_used"] = len(train_labels)
                print(f"note: --k {k} is more than the {len(train_labels)} train images; all of them vote (recorded "
                      f"as k_used)")
            record = results.make_record(run_args, eval_kind="knn", dataset=test_set.name, protocol=protocol,
                                         metrics=metrics, position=position, checkpoint_name=checkpoint_name,
                                         run=Path(run_dir).name)
            results.append_record(run_dir, record)
            print(f"kNN (k={k}, T={args.temperature}, {protocol['features']}, train features "
                  f"{args.train_features}, {view_label}) on {test_set.name} {test_set.split_name}: "
                  f"top1 {metrics['top1']:.4f} top5 {metrics['top5']:.4f}  [{run_dir}"
                  + (f", epoch {record['epoch']}]" if position else "]"))
    distributed.shutdown()


def check_flags(args, method: type | None = None) -> None:
    """Refuse, on one line, flags that cannot go together and, given the run's `method`, flags that cannot score
    a run of it; launch.py asks before it submits a grid's jobs, with the grid's evaluation flags and each run's
    method."""
    refuse_output_dir_of_a_run(args)
    if method is not None:
        refuse_missing_embedding(args, method)
    if args.train_features != "memory_bank":
        return
    if args.baseline:
        raise ConfigError("--train_features memory_bank: raw pixels have no memory bank (leave it out, or use "
                          "recomputed)")
    if method is None:  # (the rest once the run's method is known: one without a bank is said before the flag)
        return
    if not hasattr(method, "memory_bank"):
        raise ConfigError(f"--train_features memory_bank: method {method.name!r} keeps no memory bank (use "
                          f"recomputed)")
    if args.features != "embedding":
        raise ConfigError("--train_features memory_bank needs --features embedding (the bank holds embeddings)")


def memory_bank_features(loaded, train_set) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's raw memory bank rows of the labelled train images that a training step has written (what
    upstream's kNN monitor reads), and the positions of those images in `train_set`."""
    bank = torch.as_tensor(loaded.method.memory_bank)
    split = getattr(loaded.args, "train_split", "train")
    train_size = len(train_set)
    if split != "train" and not split.startswith("train+"):
        # (the unlabeled split's bank: as many rows as the train split, where sizes happen to agree, gave the votes
        # of unlabelled images' embeddings under the train images' labels)
        raise ConfigError(f"--train_features memory_bank: the run trained on its {split!r} split, so its bank holds "
                          f"no embedding of the train split's images; use --train_features recomputed")
    if len(bank) != train_size and not split.startswith("train+"):
        raise ConfigError(f"--train_features memory_bank: the bank has {len(bank)} rows, the train split "
                          f"{train_size} images")
    # Row i is the embedding of the run's training image i: with the labels of another set of as many images
    # (CIFAR-100 for a CIFAR-10 run, a folder relabelled or reordered since) the votes would go to chance. The same
    # images under other labels (CIFAR-100's 20 superclasses) are the bank's images.
    run_dataset = loaded.args.dataset
    if not same_images(train_set.name, run_dataset):
        raise ConfigError(f"--train_features memory_bank: the run's bank holds the embeddings of its {run_dataset} "
                          f"training images, not of {train_set.name}'s; leave --dataset out, or use recomputed")
    trained_on = loaded.method.info.fingerprint
    if train_set.name == run_dataset and split == "train" and trained_on and trained_on != train_set.fingerprint:
        raise ConfigError(f"--train_features memory_bank: the run's bank holds the embeddings of its own training "
                          f"images (digest {trained_on}), not of {train_set.name}'s train split here (digest "
                          f"{train_set.fingerprint}); leave --data_path out, or use recomputed")
    # a bank over train+unlabeled (STL-10) holds the labelled train images first; rows as they are, as upstream.
    # A row no step has written (an image every epoch so far left out of its full batches) is random: it votes not.
    written = torch.as_tensor(loaded.method.memory_bank_written)[:train_size].cpu()
    return bank[:train_size][written].float(), torch.nonzero(written).flatten()

