"""Clustering quality of a run, scored with ACC (Hungarian), NMI, AMI and ARI against the labels.

    python eval_cluster.py --run runs/swav_digits [--clusters 10 20]         k-means on a pre-training run's features
    python eval_cluster.py --run runs/sela_cifar10                           the heads of a main_cluster.py run
    python eval_cluster.py --baseline pixels --dataset digits --output_dir runs/pixels_digits

k-means (k-means++, --restarts) is fitted on the train split's features (or --fit_size of them) and assigns the test
split. A class-assignment run is scored head by head (argmax of each head on the test split; `--split train` scores
the train split instead, as EmbedUL reports, and the record says so); the head chosen without labels (lowest
training loss of the last epoch, divided by log K where heads differ in size) is marked `chosen` (none in a
checkpoint saved before the first epoch ended). With more clusters than classes each
cluster maps to its majority class. Datasets with superclasses (cifar100) get a second record on the superclass
labels. One record per K or head goes to RUN/metrics.jsonl; a confusion-matrix PNG and a PNG of sample images per
cluster go beside it.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .. import cli, config, data, distributed, results
from ..config import bool_flag
from ..engine import found_on_every_rank, max_over_ranks
from ..errors import ConfigError
from ..data.augment import EvalView
from ..eval.features import (asked_view_tags, baseline_view, data_protocol, extract, foreign_checkpoint_tag,
                             open_evaluation,
                             open_pixel_baseline, pixels, recorded_view, refuse_missing_embedding,
                             refuse_output_dir_of_a_run, require_finite, view_words)
from ..eval.kmeans import kmeans_assign
from ..eval.metrics import cluster_mapping, cluster_metrics, superclass_metrics
from ..eval.plots import cluster_samples_png, confusion_png

DEFAULT_RESTARTS = 10


def get_args_parser():
    parser = config.new_parser(__doc__.splitlines()[0], prog="eval_cluster.py")
    cli.add_eval_args(parser)
    parser.add_argument("--baseline", choices=["pixels"], default=None,
                        help="evaluate raw pixels instead of a run (needs --dataset and --output_dir)")
    parser.add_argument("--output_dir", type=config.path, default=None, help="where the baseline's record goes")
    parser.add_argument("--assignment", choices=["auto", "kmeans", "heads"], default="auto",
                        help="auto: the heads of a class-assignment run, k-means otherwise")
    parser.add_argument("--split", choices=["test", "train"], default="test",
                        help="split scored (train: EmbedUL's protocol, flagged in the record)")
    parser.add_argument("--clusters", type=config.cluster_count, nargs="*", default=[],
                        help="k-means: numbers of clusters (default: the number of classes)")
    parser.add_argument("--fit_on", choices=["train", "test"], default="train", help="split k-means is fitted on")
    parser.add_argument("--restarts", type=config.positive_int, default=DEFAULT_RESTARTS, help="k-means++ restarts")
    parser.add_argument("--fit_size", type=config.positive_int, default=None,
                        help="fit k-means on this many images of the fit split, drawn with --seed (default: all), "
                             "then assign the scored split (as faiss samples 256 images per centroid). "
                             "k-means runs on rank 0's CPU (scikit-learn) and its time grows with images x clusters "
                             "x restarts: README, 'k-means at scale'")
    parser.add_argument("--normalize", type=config.auto_or_bool, default="auto",
                        help="L2-normalise each image's features (or pixels) before k-means; auto: a run's features "
                             "yes, pixels no (the record says which)")
    parser.add_argument("--seed", type=config.seed, default=0, help="k-means seed")
    parser.add_argument("--plot", type=bool_flag, default=True, help="write the confusion and sample PNGs")
    return parser


# The flags of k-means, which heads do not use.
KMEANS_FLAGS = ("clusters", "fit_on", "fit_size", "restarts", "normalize", "seed", "features")


def main(argv=None):
    args = config.parse(get_args_parser(), argv)
    args.clusters = list(dict.fromkeys(args.clusters))  # --clusters 10 10 is one evaluation
    refuse_output_dir_of_a_run(args)
    distributed.configure_threads()
    ctx = distributed.init(args.device, flags=vars(args))
    if args.baseline:
        # --normalize auto: what records said before the flag was honoured, a run's features yes, pixels no
        args.normalize = False if args.normalize == "auto" else args.normalize
        run_dir, run_args, train_set, scored_set = open_pixel_baseline(args, args.split)
        view = baseline_view(args, train_set)
        if args.fit_on == "train":
            fit_set = train_set
        else:
            fit_set = scored_set if args.split == "test" else data.load(args.dataset, "test", args.data_path,
                                                                        args.download)
        bases = kmeans_protocols(args, ctx, run_dir, None, None, len(fit_set), scored_set, "pixels",
                                 data_protocol(train_set, scored_set, view, train_set.image_size))
        if bases:
            results.require_writable(run_dir)
            fit_x = pixels(fit_set, view, ctx.device, args.workers)
            scored_x = fit_x if fit_set is scored_set else pixels(scored_set, view, ctx.device, args.workers)
            if args.normalize:
                fit_x, scored_x = F.normalize(fit_x, dim=1), F.normalize(scored_x, dim=1)
            kmeans(args, ctx, run_dir, run_args, None, None, fit_x, scored_x, scored_set, bases,
                   view_words(view, scored_set), asked_view_tags(args, EvalView.of(train_set.image_size)))
    else:
        evaluation = open_evaluation(args, ctx.device, with_test_split="test" in (args.split, args.fit_on))
        loaded = evaluation.loaded
        scored_set = evaluation.train_set if args.split == "train" else evaluation.test_set
        check_flags(args, type(loaded.method))
        if scored_by_heads(args, type(loaded.method)):
            heads(args, ctx, evaluation, scored_set)
        else:
            args.normalize = True if args.normalize == "auto" else args.normalize
            fit_set = evaluation.train_set if args.fit_on == "train" else evaluation.test_set
            bases = kmeans_protocols(args, ctx, loaded.run_dir, loaded.checkpoint_name, loaded.position, len(fit_set),
                                     scored_set, args.features, evaluation.data_protocol(scored_set))
            if bases:
                results.require_writable(loaded.run_dir)
                fit_x = evaluation.features(fit_set, args.features, ctx.device, args.batch_size, args.workers,
                                            normalize=args.normalize)
                scored_x = fit_x if fit_set is scored_set else evaluation.features(
                    scored_set, args.features, ctx.device, args.batch_size, args.workers, normalize=args.normalize)
                kmeans(args, ctx, loaded.run_dir, loaded.args, loaded.position, loaded.checkpoint_name, fit_x,
                       scored_x, scored_set, bases, evaluation.view_words(scored_set),
                       evaluation.view_tags(args))
    distributed.shutdown()


def scored_by_heads(args, method: type) -> bool:
    """Whether a run of `method` is scored by its heads: --assignment heads, or auto and a class-assignment run."""
    return args.assignment == "heads" or (args.assignment == "auto" and method.program_kind == "cluster")


def check_flags(args, method: type) -> None:
    """Refuse flags that cannot score a run of `method`, on one line: --assignment heads without heads, a k-means
    flag where the heads score it. launch.py asks before it submits a grid's jobs, with the grid's evaluation flags
    and each run's method."""
    refuse_output_dir_of_a_run(args)
    if args.assignment == "heads" and method.program_kind != "cluster":
        raise ConfigError(f"--assignment heads: method {method.name!r} has no heads (give --assignment kmeans or "
                          f"auto)")
    defaults = get_args_parser()
    given = [key for key in KMEANS_FLAGS if getattr(args, key) != defaults.get_default(key)]
    if given and scored_by_heads(args, method):
        raise ConfigError(f"--{given[0]} applies to k-means, and a run of {method.name} is scored by its heads: leave "
                          f"it out, or give --assignment kmeans")
    refuse_missing_embedding(args, method)


def kmeans_protocols(args, ctx, run_dir, checkpoint_name, position, fit_images: int, scored_set, feature_kind: str,
                     view: dict) -> dict[int, dict]:
    """The protocol of each number of clusters still to evaluate, before any feature is computed (a requeued job
    whose k-means are all recorded passes over no image); a number of clusters above the images fitted on is
    refused. Collective: a K is skipped where every rank found it recorded."""
    # --fit_size only where it leaves images out: a fit on the whole split is recorded as one
    fit_size = args.fit_size if args.fit_size and args.fit_size < fit_images else None
    fitted = fit_size or fit_images
    asked = args.clusters or [scored_set.num_classes]
    too_many = [k for k in asked if k > fitted]
    if too_many:
        default = "" if args.clusters else " (the default: the number of classes)"
        raise ConfigError(f"--clusters {too_many[0]}{default} is more than the {fitted} images of the {args.fit_on} "
                          f"split k-means is fitted on (use at most {fitted})")
    # The seed only where it is not the default: records made before it was named are of seed 0.
    bases = {clusters: {"assignment": "kmeans", "fit_on": args.fit_on, "fit_size": fit_size, "clusters": clusters,
                        "features": feature_kind, "normalize": args.normalize, "restarts": args.restarts,
                        "seed": args.seed or None, "selection": "last", **view} for clusters in asked}
    found = found_on_every_rank([recorded(args, run_dir, checkpoint_name, base, scored_set, view, position)
                                 for base in bases.values()], ctx.device)
    for clusters, skipped in zip(asked, found):
        if skipped:
            if ctx.is_main:
                print(f"k-means K={clusters} already recorded for {run_dir}; skipped")
            del bases[clusters]
    return bases


def kmeans(args, ctx, run_dir, run_args, position, checkpoint_name, fit_x, scored_x, scored_set, bases: dict,
           view_label: str, view_tags: list[str]):
    """k-means for each protocol of `bases` (kmeans_protocols), on rank 0, and its records; `view_label` names the
    test view (view_words), `view_tags` the figures' (asked_view_tags)."""
    if not ctx.is_main:
        return
    for clusters, base in bases.items():
        fit_size, feature_kind = base["fit_size"], base["features"]
        predicted = kmeans_assign(fit_x, scored_x, clusters, args.restarts, args.seed, fit_size)
        settings = [feature_kind if feature_kind not in ("backbone", "pixels") else "",
                    "fit-test" if args.fit_on == "test" else "", f"fit{fit_size}" if fit_size else "",
                    "" if args.normalize == (feature_kind != "pixels") else ("l2" if args.normalize else "raw"),
                    f"seed{args.seed}" if args.seed else "",
                    f"restarts{args.restarts}" if args.restarts != DEFAULT_RESTARTS else "", *view_tags]
        report(args, run_dir, run_args, position, checkpoint_name, scored_set, predicted, clusters, [base],
               f"k-means K={clusters} ({feature_kind}, fit on {args.fit_on}, {view_label})",
               figure_tag(f"kmeans_k{clusters}", scored_set, run_args, checkpoint_name, settings))


def recorded(args, run_dir, checkpoint_name, base: dict, scored_set, view: dict, position) -> bool:
    """Whether --skip_recorded skips the assignment of protocol `base`: RUN holds its record and, where the data has
    superclasses, its superclass record too (`report` appends them one after the other: a stop in between leaves
    the second to write)."""
    wanted = results.Wanted(scored_set.name, [recorded_view(view)], position)
    needed = [False] if scored_set.superclass_labels is None else [False, True]
    return all(results.skip_recorded(args, run_dir, "cluster", checkpoint_name,
                                     {**base, "split": args.split, "superclass": superclass}, wanted)
               for superclass in needed)


def heads(args, ctx, evaluation, scored_set):
    loaded = evaluation.loaded
    method = loaded.method
    sizes, chosen = method.head_sizes, method.chosen_head()
    if chosen is None and ctx.is_main:
        print(f"note: {loaded.checkpoint_name} of {loaded.run_dir} was saved before its first epoch ended: no head "
              f"losses to choose a head by, so every head is scored and none is marked chosen")
    # Each head's class per image, not its logits: Self-Classifier's ImageNet heads (15,000 logits an image) would
    # gather 72 GiB onto every rank for the train split. Class ids are exact in float32 below 2**24.
    def classes(x):
        # NaN where a head's logits are not finite (argmax would pick a class): a diverged run is refused, as for
        # k-means and kNN, instead of recording chance
        logits = method.head_logits(x)
        chosen_class = torch.stack([head.argmax(dim=1) for head in logits], dim=1).float()
        finite = torch.stack([torch.isfinite(head).all(dim=1) for head in logits], dim=1)
        return chosen_class.masked_fill(~finite, float("nan"))

    view, view_label = evaluation.data_protocol(scored_set), evaluation.view_words(scored_set)
    pending = {}  # head: the records it still needs
    for head, size in enumerate(sizes):
        # Every head's own record, the chosen one's included, so that a head's row holds it for every seed; the
        # chosen head's second record is the run's result (its row averages seeds that choose different heads of one
        # size; a chosen head of another size is scored under another protocol, its clusters and mapping, and gets a
        # row of its own).
        selections = [{"selection": "all-heads"}]
        if head == chosen:
            selections.append({"chosen": True, "selection": "lowest-loss"})
        bases = [{"assignment": "head", "head": head, "clusters": size, **selection, "features": "heads", **view}
                 for selection in selections]
        pending[head] = [base for base in bases if not recorded(args, loaded.run_dir, loaded.checkpoint_name, base,
                                                                scored_set, view, loaded.position)]
    # Every rank reads the same metrics.jsonl, but a record another job appends in between could part them: any rank
    # with a head left makes every rank take part in the pass over the split (a requeued job whose heads are all
    # recorded makes none).
    if max_over_ranks(float(any(pending.values())), ctx.device):
        results.require_writable(loaded.run_dir)
        assignments = require_finite(extract(classes, scored_set, method.eval_view, method.info.mean, method.info.std,
                                             ctx.device, args.batch_size, args.workers, normalize=False),
                                     loaded, "head logits", scored_set).long().cpu().numpy().T
    else:
        assignments = [None] * len(sizes)
    if not ctx.is_main:
        return
    for head, predicted in enumerate(assignments):
        if pending[head]:
            marked = ", chosen" if head == chosen else ""
            report(args, loaded.run_dir, loaded.args, loaded.position, loaded.checkpoint_name, scored_set, predicted,
                   sizes[head], pending[head], f"head {head} ({sizes[head]} classes{marked}, {view_label})",
                   figure_tag(f"head{head}", scored_set, loaded.args, loaded.checkpoint_name,
                              evaluation.view_tags(args)),
                   plot=any(base.get("chosen") for base in pending[head]))
        else:
            print(f"head {head} already recorded for {loaded.run_dir} ({loaded.checkpoint_name}, epoch "
                  f"{loaded.epoch}); skipped")


def figure_tag(tag: str, scored_set, run_args, checkpoint_name: str | None, settings: tuple | list = ()) -> str:
    """TAG, then what differs from the run's defaults (another dataset, `settings`, a checkpoint from another
    directory by a digest of its path), so that figures of other evaluations do not replace each other; the run's
    defaults keep the names they always had."""
    parts = [scored_set.name if scored_set.name != run_args.dataset else "", *settings,
             foreign_checkpoint_tag(checkpoint_name)]
    return tag + "".join(f"_{part}" for part in parts if part)


def report(args, run_dir, run_args, position, checkpoint_name, scored_set, predicted, clusters, bases, title, tag,
           plot=True):
    """Append the records of one assignment (classes, and superclasses where the dataset has them), one for each
    protocol of `bases` (a head's own record and, for the chosen head, the run's result: the same metrics), after
    its figures: a stop signal between the two would leave a record whose figures `--skip_recorded` never draws. A
    figure that fails to draw still lets the records be written, then its error ends the program."""
    truth = scored_set.labels.numpy()
    _, mapping_kind = cluster_mapping(truth, predicted, clusters, scored_set.num_classes)
    views = [("classes", cluster_metrics(truth, predicted, clusters, scored_set.num_classes), False)]
    if scored_set.superclass_labels is not None:
        # (Self-Classifier's protocol; the clustering papers' CIFAR-100-20 numbers match clusters to the 20 directly)
        label = (f"superclasses through the {scored_set.num_classes} classes (CIFAR-100-20 as the clustering papers "
                 f"score it: --dataset cifar100_20)")
        views.append((label, superclass_metrics(truth, scored_set.superclass_labels.numpy(), predicted,
                                                         clusters, scored_set.num_classes), True))
    drawing_failed = None
    if args.plot and plot:
        stem = Path(run_dir) / f"{tag}_{Path(checkpoint_name or 'pixels').stem}_{args.split}"
        try:
            confusion_png(truth, predicted, clusters, scored_set.class_names, f"{stem}_confusion.png",
                          f"{run_args.method} on {scored_set.name}: {title}, ACC {views[0][1]['acc']:.3f}")
            cluster_samples_png(scored_set, predicted, f"{stem}_samples.png", f"{run_args.method}: {title}")
        except Exception as error:  # (not a stop signal's SystemExit: the records wait for the figures then)
            drawing_failed = error
    for base in bases:
        for _, metrics, superclass in views:
            protocol = {key: value for key, value in {**base, "mapping": mapping_kind, "superclass": superclass,
                                                      "split": args.split}.items() if value is not None}
            record = results.make_record(run_args, eval_kind="cluster", dataset=scored_set.name, protocol=protocol,
                                         metrics=metrics, position=position, checkpoint_name=checkpoint_name,
                                         run=Path(run_dir).name, split=args.split)
            results.append_record(run_dir, record)
    for label, metrics, _ in views:
        print(f"{title} on {scored_set.name} {scored_set.split_name} {label}: ACC {metrics['acc']:.4f} "
              f"NMI {metrics['nmi']:.4f} AMI {metrics['ami']:.4f} ARI {metrics['ari']:.4f}  [{run_dir}]")
    if drawing_failed is not None:
        raise drawing_failed

