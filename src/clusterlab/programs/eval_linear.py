"""Linear probe on a run's frozen backbone: top-1 / top-5 on the test split at the last epoch.

    python eval_linear.py --run runs/unmix_c10_400ep [--cached_features true]

Upstream protocol (SwAV's eval_linear.py as Un-Mix's CIFAR copy runs it): 100 epochs, SGD lr 0.3, momentum 0.9,
cosine to 0, weight decay 1e-6, batch 32 (the global batch here; upstream's is per GPU), RandomResizedCrop(scale
0.08-1) + flip on the train split, the whole test image; the pre-training normalisation (upstream evaluates CIFAR
with a different std than it trained with: a bug we do not copy). Under --amp the frozen backbone runs in bf16 or
fp16 for the training crops and the test (or cached) features alike; the classifier stays float32. The best test
epoch, which upstream reports, is recorded as a separately flagged value. The
probe trains in RUN/linear_epNNNN[_stepS][_cached]/ (the epoch and step of the weights it probes; its batch size,
seed, optimisation flags where they differ from the defaults, and its precision where --amp makes it bf16 or fp16,
are added to the name) and resumes from there; one record goes to RUN/metrics.jsonl.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

from .. import checkpoint, cli, config, distributed, engine, optim, results, rundir
from ..config import bool_flag
from ..data.augment import EvalView
from ..errors import CheckpointError, ConfigError
from ..eval.features import (asked_view_tags, foreign_checkpoint_tag, open_evaluation, requested_checkpoint_name,
                             requested_record)
from ..eval.linear import OPTIMISATION_FLAGS, FeatureSet, LinearProbe, topk_accuracy


def get_args_parser():
    parser = config.new_parser(__doc__.splitlines()[0], prog="eval_linear.py")
    cli.add_eval_args(parser, batch_size=False, features=False)
    cli.add_optim_args(parser)
    parser.set_defaults(epochs=100, batch_size=32, optimizer="sgd", lr=0.3, final_lr=0.0, schedule="cosine",
                        momentum=0.9, weight_decay=1e-6, sync_bn=False, amp="off")
    parser.add_argument("--cached_features", type=bool_flag, default=False,
                        help="train on features of unaugmented images extracted once (a different protocol)")
    parser.add_argument("--seed", type=config.seed, default=0)
    parser.add_argument("--log_every", type=config.positive_int, default=200)
    return parser


# Named in every record's protocol; the other flags that set a probe's result only where they are not the default.
ALWAYS_RECORDED = ("epochs", "lr", "batch_size", "weight_decay")


def probe_precision(args) -> str | None:
    """The precision the probe trains in (--amp resolved on its device: auto is bf16 on CUDA from Ampere on, fp16
    on older cards), None for float32."""
    name = engine.precision_name(engine.resolve_precision(args.amp, distributed.pick_device(args.device)))
    return None if name == "float32" else name


def changed_flags(args) -> dict:
    """The probe's batch size, seed and optimisation flags whose values are not the defaults, in that order."""
    defaults = get_args_parser()
    return {key: value for key in ("batch_size", "seed", *OPTIMISATION_FLAGS)
            if (value := getattr(args, key)) != defaults.get_default(key)}


def linear_protocol(args, changed: dict) -> dict:
    """The probe's protocol as --skip_recorded asks for it: the augmentation, ALWAYS_RECORDED, then the seed and
    every other optimisation flag, None at its default (a record leaves those out, and a record of another value
    must not stand for the default; `changed`: `changed_flags`), and the precision where it is not float32."""
    protocol = {"augmentation": "cached" if args.cached_features else "augmented",
                **{key: getattr(args, key) for key in ALWAYS_RECORDED}}
    for key in ("seed", *OPTIMISATION_FLAGS):
        protocol.setdefault(key, changed.get(key))
    protocol["precision"] = probe_precision(args)
    return protocol


def probe_dir(args, loaded, dataset: str, protocol: dict, changed: dict, own_view: EvalView,
              own_resize: int = 0, other_images: str | None = None) -> Path:
    """RUN/linear_epNNNN[_stepS][_cached][_FLAGVALUE...][_bf16|_fp16][_DATASET][_FOLDER-DIGEST][_cropC][_resizeR]
    [_fromHASH]: a probe per state of the weights (checkpoint.pth moves on as the run trains; checkpoint_epNNNN.pth is
    the same weights as checkpoint.pth at epoch NNNN), protocol, optimisation and precision, naming the optimisation
    flags that differ from the defaults, a precision other than float32, a dataset other than the run's, other
    training images than the run's (`Evaluation.other_images_tag`), the test view
    asked for (a crop or resize other than those of the run's `own_view` and recorded resize `own_resize`: its own
    asked for by name trained a second, identical probe), and a checkpoint from outside the run (by a digest of its
    path)."""
    flags = [f"_{key}{'-'.join(map(str, value)) if isinstance(value, list) else value}"
             for key, value in changed.items()]
    if protocol["precision"]:
        flags.append(f"_{protocol['precision']}")
    if dataset != loaded.args.dataset:
        flags.append(f"_{dataset}")
    if other_images:
        flags.append(f"_{other_images}")
    flags += [f"_{tag}" for tag in asked_view_tags(args, own_view, own_resize)]
    foreign = foreign_checkpoint_tag(loaded.checkpoint_name)
    if foreign:
        flags.append(f"_{foreign}")
    name = (f"linear_ep{loaded.epoch:04d}{f'_step{loaded.step}' if loaded.step else ''}"
            f"{'_cached' if args.cached_features else ''}{''.join(flags)}")
    # (a value's "+" is left out: "-" in its place named 1e+20 as 1e-20)
    return loaded.run_dir / re.sub(r"[^A-Za-z0-9._-]", "-", name.replace("+", ""))


def check_flags(args, method: type | None = None) -> None:
    """Refuse flags that cannot go together, on one line (whatever the run's method: launch.py asks before it
    submits a grid's jobs, as it asks the other evaluations)."""
    optim.refuse_unread_flags(args, get_args_parser(), "probe")
    for flag in ("sync_bn", "find_unused"):  # (accepted, and nothing changed)
        if getattr(args, flag):
            raise ConfigError(f"--{flag} does nothing in a linear probe (its frozen backbone's batch norm runs in eval "
                              f"mode; the head uses every parameter): leave --{flag} out")
    if args.cached_features and (args.compile or args.channels_last):
        flag = "--compile" if args.compile else "--channels_last"
        raise ConfigError(f"{flag} does nothing with --cached_features true (the probe is then one linear layer on "
                          f"stored features): leave {flag} out, or use --cached_features false")


def main(argv=None):
    args = config.parse(get_args_parser(), argv)
    check_flags(args)
    distributed.configure_threads()
    changed = changed_flags(args)
    asked = linear_protocol(args, changed)
    ctx = distributed.init(args.device, flags=vars(args))
    if engine.found_on_every_rank([results.skip_recorded(
            args, args.run, "linear", requested_checkpoint_name(args.run, args.checkpoint), asked,
            requested_record(args))], ctx.device)[0]:
        if ctx.is_main:
            print(f"linear ({asked['augmentation']}, {args.epochs} epochs) already recorded for {args.run}; skipped")
        distributed.shutdown()
        return
    engine.seed_everything(args.seed)
    evaluation = open_evaluation(args, ctx.device)
    loaded, method = evaluation.loaded, evaluation.loaded.method
    results.require_writable(loaded.run_dir)  # (where the probe's folder goes)
    info, size = method.info, method.eval_size

    precision = engine.resolve_precision(args.amp, ctx.device)

    def backbone_features(images):
        # In the precision the probe trains in (its training images pass the backbone under autocast): test
        # features in float32 would score the head on other features than it learnt from.
        try:
            with torch.autocast(ctx.device.type, dtype=precision or torch.float32, enabled=precision is not None):
                return evaluation.features(images, "backbone", ctx.device, 512, args.workers, normalize=False)
        except CheckpointError as error:
            if precision != torch.float16:
                raise
            raise CheckpointError(f"{error} (or fp16 overflowed where float32 would not: try --amp bf16 or off)") \
                from None

    folder = probe_dir(args, loaded, evaluation.test_set.name, asked, changed, evaluation.own_view,
                       evaluation.own_resize, evaluation.other_images_tag())
    # (its folder is named after the probe's flags: another probe is one with other flags). Taken before the
    # features are extracted: a probe another job holds is refused at once, not after minutes of extraction.
    with engine.owned_run_dir(folder, ctx, "probe with other flags", named="the probe folder") as run:
        test_features = backbone_features(evaluation.test_set)
        train_set = evaluation.train_set
        if args.cached_features:
            train_set = FeatureSet(backbone_features(train_set).cpu(), train_set.labels)
        # (the run's own view asked for by name is the probe of no flag, as its folder's name says: not a change)
        probe_args = config.argparse.Namespace(**{**vars(args), **evaluation.asked_view(args), "method": "linear",
                                                  "checkpoint_epochs": [], "knn_monitor_every": 0,
                                                  "probed_epoch": loaded.epoch,
                                                  "probed_step": loaded.step,
                                                  "probed_weights": checkpoint.weights_digest(method.backbone),
                                                  "dataset": evaluation.test_set.name, "arch": loaded.args.arch,
                                                  "width": loaded.args.width, "nmb_crops": [1],
                                                  "size_crops": [size], "output_dir": str(folder)})
        # The probe's checkpoint describes the images it is trained on, which --data_path may choose, not the run's.
        probe_info = dataclasses.replace(info, num_samples=len(evaluation.train_set),
                                         fingerprint=evaluation.train_set.fingerprint)
        probe = LinearProbe(probe_args, method.backbone, probe_info, test_features.shape[1],
                            evaluation.test_set.num_classes, size, args.cached_features, ctx.device).to(ctx.device)
        trainer, start_epoch, start_step = engine.start_run(probe, probe_args, ctx, train_set, "linear",
                                                            "eval_linear.py", run)
        for epoch in range(start_epoch, args.epochs):
            completed = trainer.train_one_epoch(epoch, start_step)
            start_step = 0
            if completed:
                scores = test_accuracy(probe, test_features, evaluation.test_set.labels)
                if scores["top1"] > probe.best["top1"]:
                    probe.best = {"top1": scores["top1"], "epoch": epoch + 1}
                if ctx.is_main:
                    rundir.append_jsonl(trainer.run_dir / "train_log.jsonl", {
                        "epoch": epoch, "test_top1": scores["top1"], "test_top5": scores["top5"],
                        "time": rundir.now_iso()})
                    print(f"epoch {epoch + 1}/{args.epochs}: test top1 {scores['top1']:.4f} "
                          f"top5 {scores['top5']:.4f}")
                trainer.end_of_epoch(epoch)
            if trainer.requeue_now(epoch, completed):
                trainer.save_and_requeue()
        trainer.finish()

    final = test_accuracy(probe, test_features, evaluation.test_set.labels)
    if ctx.is_main:
        protocol = {"features": "backbone", "fit_on": "train", "selection": "last", "best_on_test_flagged": True,
                    **{key: value for key, value in asked.items() if value is not None},
                    **evaluation.data_protocol()}
        metrics = {"top1": final["top1"], "top5": final["top5"], "best_top1_on_test": probe.best["top1"],
                   "best_epoch_on_test": probe.best["epoch"]}
        record = results.make_record(loaded.args, eval_kind="linear", dataset=evaluation.test_set.name,
                                     protocol=protocol, metrics=metrics, position=loaded.position,
                                     checkpoint_name=loaded.checkpoint_name, run=loaded.run_dir.name)
        record["trained_by"] = list(trainer.trained_by)  # the code of every start of the probe (a resumed one's too)
        results.append_record(loaded.run_dir, record)
        test_set = evaluation.test_set
        print(f"linear ({asked['augmentation']}, {evaluation.view_words()}) on {test_set.name} {test_set.split_name}: "
              f"top1 {final['top1']:.4f} top5 {final['top5']:.4f} (best epoch on test, flagged: "
              f"{probe.best['top1']:.4f} at epoch {probe.best['epoch']})  [{loaded.run_dir}, epoch {loaded.epoch}]")
    distributed.shutdown()


@torch.no_grad()
def test_accuracy(probe: LinearProbe, features: torch.Tensor, labels: torch.Tensor) -> dict:
    probe.eval()
    logits = probe.head(features.to(probe.head.weight.device))
    return topk_accuracy(logits, labels)

