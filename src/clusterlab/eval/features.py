"""Rebuild a trained method from its run directory and extract features of a dataset split."""
from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import checkpoint, distributed
from ..config import canonical_keys, read_run_config
from ..data import ImageSet
from ..data import loader as data_loader
from ..data.augment import EvalView, eval_view, refuse_oversized
from ..data.registry import imagefolder_sizes, real_data_folder, resolve_path, same_images
from ..errors import CheckpointError, ConfigError, UserError, printable
from ..methods import METHODS, DataInfo, Method
from ..methods.base import test_view_size
from ..models.heads import unit_rows
from ..results import Wanted, foreign_checkpoint

TRAINED_KINDS = ("pretrain", "cluster")
DEFAULT_CHECKPOINT = "checkpoint.pth"


@dataclass
class LoadedRun:
    run_dir: Path
    args: argparse.Namespace
    method: Method
    epoch: int
    step: int  # within the epoch: 0 at its end, more where a stop signal saved the checkpoint mid-epoch
    checkpoint_name: str
    data_folder: str | None = None  # the folder its files were read from at its last start (None: digits, or older)

    @property
    def position(self) -> tuple[int, int]:
        return self.epoch, self.step


def checkpoint_position(state: dict) -> tuple[int, int]:
    """(epoch, step) where a trainer checkpoint stands (step 0 at an epoch's end)."""
    return int(state["epoch"]), int(state.get("step", 0))


def requested_checkpoint_name(run_dir: str | None, requested: str | None) -> str:
    """How records name the checkpoint --checkpoint asks for, known before the run is opened, so that
    --skip_recorded can skip without loading anything: a file of the run by its name (default checkpoint.pth), any
    other by its full path (a record of the run's own file of that name does not stand for it)."""
    return recorded_checkpoint_name(checkpoint_path(run_dir or ".", requested), run_dir or ".")


def recorded_checkpoint_name(path: Path, run_dir: str | Path) -> str:
    return path.name if in_run(path, run_dir) else str(path.resolve())


def requested_record(args: argparse.Namespace) -> Wanted:
    """What a record must name to stand for the evaluation of --run asked for, for --skip_recorded before the run is
    opened: the run's dataset, its checkpoint's (epoch, step), and the test view in each form a record may name it
    (see `data_protocol`): --eval_crop / --eval_resize where given, else the run's own view. An in-memory set's
    record names no view at the run's default crop, else its `eval_crop`; an image folder's names `eval_crop`,
    `eval_resize` and how many images the folder's splits hold (listed now, not read), and no view named marks an
    in-memory record. The flags come from the run's config and its
    checkpoint (memory-mapped: only what is read is loaded). No view at all (nothing then stands for it) when
    --skip_recorded does not apply, or when the run cannot be read (the evaluation then says why)."""
    if not (args.skip_recorded and args.run):
        return Wanted(views=[])
    try:
        state = checkpoint.load(checkpoint_path(args.run, args.checkpoint), kind=TRAINED_KINDS, mmap=True)
        recorded = {**read_run_config(args.run), **state.get("args", {})}
        default_crop = test_view_size(int(recorded.get("eval_crop") or 0),
                                      [int(size) for size in recorded.get("size_crops") or [0]],
                                      int(state["data_info"]["image_size"]))
        resize = args.eval_resize or int(recorded.get("eval_resize") or 0)
        dataset = str(recorded["dataset"])
        path = resolve_path(dataset, recorded.get("data_path"))
        # as data_protocol names an image folder: a folder whose images were added or removed since is other data
        folder = {"data": folder_name(path)}
        if dataset == "imagefolder":
            folder["train_images"], folder["scored_images"] = imagefolder_sizes(path)
        position = checkpoint_position(state)
    except (UserError, OSError, KeyError, TypeError, ValueError):
        return Wanted(views=[])
    crop = args.eval_crop or default_crop
    return Wanted(dataset, [recorded_view({} if crop == default_crop else {"eval_crop": crop}),
                            {**folder, "eval_crop": crop, "eval_resize": resize or crop}], position)


def recorded_view(view: dict) -> dict:
    """`view` (what `data_protocol` gives) as a record must match it: the keys an in-memory record leaves out asked
    for as absent, so a record of another view is not taken for it."""
    return {"data": None, "eval_resize": None, "eval_crop": None, **view}


def refuse_missing_embedding(args: argparse.Namespace, method: type) -> None:
    """--features embedding of a method with no embedding of its own scored its backbone features, recorded as an
    embedding's (a second row of the same numbers)."""
    if getattr(args, "features", None) == "embedding" and method.embedding is Method.embedding:
        raise ConfigError(f"--features embedding: method {method.name!r} has no embedding of its own, only its "
                          f"backbone features (use --features backbone)")


def checkpoint_path(run_dir: str | Path, requested: str | None) -> Path:
    """--checkpoint: a bare file name is the run directory's file of that name (default checkpoint.pth), whatever
    the current directory holds; a path (with a directory part) is that file."""
    requested = requested or DEFAULT_CHECKPOINT
    return Path(run_dir) / requested if Path(requested).name == requested else Path(requested)


def in_run(path: Path, run_dir: str | Path) -> bool:
    """Whether checkpoint `path` is a file of the run directory (a checkpoint.pth linked to scratch included)."""
    return path.absolute().parent.resolve() == Path(run_dir).resolve()


def foreign_checkpoint_tag(checkpoint_name: str | None) -> str:
    """For names of files an evaluation writes: `fromHASH` (a digest of the path) for a checkpoint of another
    directory, which records name by its full path; '' for the run's own checkpoints and for none."""
    if not foreign_checkpoint(checkpoint_name):
        return ""
    return f"from{hashlib.sha256(checkpoint_name.encode()).hexdigest()[:8]}"


def load_run(run_dir: str | Path, checkpoint_name: str | None, device: torch.device) -> LoadedRun:
    """The method of `run_dir` with the weights of `checkpoint_name` (default checkpoint.pth), in eval mode."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"--run {str(run_dir)!r} is not a directory")
    saved_args = read_run_config(run_dir)
    path = checkpoint_path(run_dir, checkpoint_name)
    # Trainer checkpoints only: a linear probe's checkpoint holds a classifier, not a method to rebuild.
    state = checkpoint.load(path, kind=TRAINED_KINDS)
    if not isinstance(state.get("args", {}), dict):
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit run {str(run_dir)!r}: its args are not a "
                              f"mapping")
    method_name = state.get("args", {}).get("method", saved_args.get("method"))
    if saved_args.get("method") not in (None, method_name):
        raise CheckpointError(f"checkpoint {str(path)!r} was trained by method {method_name!r}, run "
                              f"{str(run_dir)!r} by {saved_args['method']!r}: give --run the directory of the run "
                              f"that wrote it")
    if method_name not in METHODS:
        raise ConfigError(f"run {str(run_dir)!r} used method {method_name!r}, unknown to this version")
    # (its args win over config.yaml's below: another run's checkpoint was scored as this run's, on that run's data,
    # and recorded in this run's metrics.jsonl)
    trained_on = state.get("args", {}).get("dataset")
    if saved_args.get("dataset") not in (None, trained_on) and trained_on is not None:
        raise CheckpointError(f"checkpoint {str(path)!r} was trained on {trained_on!r}, run {str(run_dir)!r} on "
                              f"{saved_args['dataset']!r}: give --run the directory of the run that wrote it")
    # A flag added to the suite after the run was trained takes its default, and a flag recorded under a name
    # that is now an alias (low_dim, before --embed_dim) gives its value to the flag; the checkpoint's record wins
    # over config.yaml's. The model is rebuilt only to load the run's weights into it.
    parser = training_parser(method_name)
    recorded = {**canonical_keys(parser, saved_args, str(run_dir / "config.yaml"), known_only=False),
                **canonical_keys(parser, state.get("args", {}), str(path), known_only=False)}
    args = argparse.Namespace(**{**vars(parser.parse_args(["--method", method_name])), **recorded})
    try:
        method = METHODS[args.method](args, DataInfo(**state["data_info"]), device)
        method.load_state_dict(state["model"])
        method.load_extra_state(state.get("method_state", {}))
        position = checkpoint_position(state)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as err:
        # Written by another version, or edited: the rebuilt model and the weights disagree.
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit run {str(run_dir)!r}: "
                              f"{checkpoint.failure_reason(err)}") from None
    checkpoint.require_finite_weights(state, path)
    method.to(device).eval()
    # A file of another directory is recorded under its full path: a record of the run's own file of that name
    # would otherwise stand for it (and --skip_recorded would skip the run's own evaluation).
    data_folder = state.get("data_folder") if isinstance(state.get("data_folder"), str) else None
    return LoadedRun(run_dir, args, method, *position, recorded_checkpoint_name(path, run_dir), data_folder)


def load_run_on_every_rank(run_dir: str | Path, checkpoint_name: str | None, device: torch.device) -> LoadedRun:
    """Collective: `load_run` on every rank, refused on all of them where one rank cannot load the run (the others
    met its missing collectives: a traceback) or where the ranks loaded different weights (each node reading a copy
    of its own: features of other weights were scored together, and recorded, without a word)."""
    if distributed.world_size() == 1:
        return load_run(run_dir, checkpoint_name, device)
    try:
        loaded = load_run(run_dir, checkpoint_name, device)
        outcome = {"weights": checkpoint.weights_digest(loaded.method)}
    except Exception as error:  # (any: a rank leaving before the collective below would leave the others waiting)
        loaded, outcome = error, {"error": (str(error).splitlines() or [type(error).__name__])[0]}
    outcomes = [json.loads(text) for text in distributed.every_ranks_text(json.dumps(outcome))]
    if isinstance(loaded, Exception):
        raise loaded  # this rank's own error
    failed = [(rank, seen["error"]) for rank, seen in enumerate(outcomes) if "error" in seen]
    if failed:
        raise ConfigError(f"--run {str(run_dir)!r}: rank(s) {distributed.rank_list([rank for rank, _ in failed])} "
                          f"cannot load it ({failed[0][1]}): every node must see the same run directory")
    ranks_of: dict[str, list[int]] = {}
    for rank, seen in enumerate(outcomes):
        ranks_of.setdefault(seen["weights"], []).append(rank)
    if len(ranks_of) > 1:
        seen = "; ".join(f"digest {digest} on rank(s) {distributed.rank_list(ranks)}"
                         for digest, ranks in ranks_of.items())
        raise CheckpointError(f"--run {str(run_dir)!r}: the ranks loaded different weights ({seen}): every node must "
                              f"see the same run directory")
    return loaded


def training_parser(method: str) -> argparse.ArgumentParser:
    """The parser of the program that trains `method`, with the method's flags."""
    from ..programs import PROGRAMS, TRAINING_PROGRAMS

    kind = METHODS[method].program_kind
    program = next(PROGRAMS[name] for name in TRAINING_PROGRAMS if PROGRAMS[name].program_kind == kind)
    return program.parser({"method": method})


@torch.no_grad()
def extract(fn, images: ImageSet, view: EvalView, mean, std, device: torch.device, batch_size: int = 512,
            workers: int = 0, normalize: bool = True) -> torch.Tensor:
    """fn(test views) for every image of `images`, in dataset order, computed by all ranks and gathered. Unreadable
    image files are replaced as in training (the next readable file), within the same limit: above BAD_FILE_LIMIT
    of the images, or with a file that cannot be used on any rank, every rank stops with a DataError."""
    share = distributed.shard_range(len(images))
    outputs = []
    tally = data_loader.BadFiles.limited(images, device)
    for batch, _ in data_loader.sequential(images, torch.arange(share.start, share.stop), batch_size, workers,
                                           device, view, tally=tally):
        out = fn(eval_view(batch, view.crop, mean, std)).float()
        outputs.append(unit_rows(out) if normalize else out)
    tally.check_pass(images)
    # (an empty share is one empty batch, whose rows have the width of the others': all_gather needs it)
    return distributed.all_gather_uneven(torch.cat(outputs))


def require_finite(features: torch.Tensor, loaded: LoadedRun, what: str, images: ImageSet) -> torch.Tensor:
    """`features`, or a CheckpointError when any of them is NaN or infinite. Finite weights (all that
    checkpoint.require_finite_weights can check) may still overflow in the forward pass: a run that diverged keeps,
    as its last good checkpoint, weights and batch-norm statistics of 1e5 to 1e13, whose eval-mode outputs are inf,
    then NaN once normalised. kNN then scored chance (top-5 below top-1) and k-means failed with scikit-learn's
    traceback. Every rank holds the gathered features, so every rank raises."""
    overflowing = checkpoint.non_finite_rows(features)
    if overflowing:
        raise CheckpointError(f"checkpoint {loaded.checkpoint_name!r} of run {str(loaded.run_dir)!r} gives "
                              f"non-finite {what} for {overflowing} of {len(features)} {images.split_name} images "
                              f"(its weights are finite but overflow: the run diverged); evaluate an earlier "
                              f"checkpoint (--checkpoint checkpoint_epNNNN.pth)")
    return features


def data_protocol(train_set: ImageSet, scored_set: ImageSet, view: EvalView, default_crop: int) -> dict:
    """What a metrics record's protocol says about the data and the test view.

    An image folder: its name (the last component of DATA_PATH, links resolved) and how many images its training
    and scored splits hold, so that subsets of different sizes, or folders of different names, get table rows of
    their own; two different folders of one name with equal counts (two `data/`) share a row. Then the test view's
    resize and centre crop. A registered in-memory dataset, named by the record's `dataset`, is seen whole, resized
    to the view's crop (the resize does not apply): nothing at `default_crop` (the run's own; the baseline's: the
    images' size), as records said before the image-folder pipeline, else `eval_crop`."""
    if scored_set.in_memory:
        return {} if view.crop == default_crop else {"eval_crop": view.crop}
    return {"data": folder_name(train_set.folder), "train_images": len(train_set),
            "scored_images": len(scored_set), "eval_resize": view.resize, "eval_crop": view.crop}


def view_words(view: EvalView, images: ImageSet) -> str:
    """The test view as a result line names it: "20 px" (an in-memory set seen whole at that size; image files whose
    shorter side is resized to 20, then cropped to their centre 20 x 20), "28 px, centre 20 px" (image files whose
    shorter side is resized to 28, then the centre crop)."""
    if images.in_memory or view.resize == view.crop:
        return f"{view.crop} px"
    return f"{view.resize} px, centre {view.crop} px"


def folder_name(path: str | Path) -> str:
    """An image folder's name in records: the last component of its real path, printable (a name that is not UTF-8
    could not be written to the tables)."""
    return printable(Path(path).resolve().name)


def asked_view(args: argparse.Namespace, own_view: EvalView, own_resize: int = 0) -> dict:
    """{"eval_crop": C, "eval_resize": R}: each flag's value where it changes the test view from `own_view` (a run's
    own, its recorded --eval_resize `own_resize`, 0 for none; or a baseline's: the images' size), else 0. A flag
    that changes nothing is no other view: the own view asked for by name is the same evaluation (it made a second
    probe, or the same figure under a second name). A resize is compared with the one the view gets without the
    flag, the recorded one, else the crop's size: a crop of 6 px of an 8 px run without a resize is seen at 6 px, and
    `--eval_crop 6 --eval_resize 8` is another view (both were named crop6)."""
    unasked_resize = own_resize or args.eval_crop or own_view.crop
    return {flag: asked if asked not in (0, unasked) else 0
            for flag, asked, unasked in (("eval_crop", args.eval_crop, own_view.crop),
                                         ("eval_resize", args.eval_resize, unasked_resize))}


def asked_view_tags(args: argparse.Namespace, own_view: EvalView, own_resize: int = 0) -> list[str]:
    """cropC / resizeR for the flags of `asked_view`, to name the probes and figures of another view apart."""
    return [f"{flag.removeprefix('eval_')}{value}" for flag, value in asked_view(args, own_view, own_resize).items()
            if value]


def baseline_view(args: argparse.Namespace, images: ImageSet) -> EvalView:
    """The pixel baseline's view: --eval_crop / --eval_resize, by default the set's (nominal) image size."""
    return EvalView.of(args.eval_crop or images.image_size, args.eval_resize)


def pixels(images: ImageSet, view: EvalView, device: torch.device = torch.device("cpu"),
           workers: int = 0) -> torch.Tensor:
    """Raw pixels / 255 of each image's test `view`, flattened, returned on the CPU: the baseline every method must
    beat. Computed as `extract` computes features: each rank resizes its share on `device` (the process group's; a
    CUDA run gathers the whole set there, where the kNN then holds it) and unreadable files are limited alike."""
    identity = (0.0,) * images.channels, (1.0,) * images.channels  # (x - 0) / 1: the pixels themselves
    return extract(lambda x: x.flatten(1), images, view, *identity, device, workers=workers, normalize=False).cpu()


@dataclass
class Evaluation:
    """A run opened for evaluation: its method, and the train and test splits it is evaluated on."""

    loaded: LoadedRun
    train_set: ImageSet
    test_set: ImageSet | None
    own_view: EvalView  # the run's own test view, before --eval_crop / --eval_resize
    own_resize: int     # the run's recorded --eval_resize (0: none)
    data_path: str | None  # what the splits were read from (the run's own where no --data_path was given)

    def features(self, images: ImageSet, kind: str, device: torch.device, batch_size: int, workers: int,
                 normalize: bool = True):
        method = self.loaded.method
        fn = method.features if kind == "backbone" else method.embedding
        info = method.info
        return require_finite(extract(fn, images, method.eval_view, info.mean, info.std, device, batch_size, workers,
                                      normalize), self.loaded, f"{kind} features", images)

    def data_protocol(self, scored_set: ImageSet | None = None) -> dict:
        """`data_protocol`, with another folder of the run's dataset holding other training images named as
        `other_images_tag` names it (its digest: a row of its own, as its probe has a folder of its own; under the
        folder's bare name it shared the row of the run's own folder of that name, and --skip_recorded took it for
        the run's own evaluation). A folder with the run's file names and labels keeps its name: its pixels may
        differ (a resized copy), which the fingerprint does not see."""
        protocol = data_protocol(self.train_set, scored_set or self.test_set, self.loaded.method.eval_view,
                                 self.own_view.crop)
        if "data" in protocol:
            protocol["data"] = self.other_images_tag() or protocol["data"]
        return protocol

    def other_images_tag(self) -> str | None:
        """`FOLDER-DIGEST` where the evaluation reads another folder than the run trained on, holding other training
        images (its fingerprint's first 8 characters: two folders of one name apart). None for the run's own files,
        wherever they are read from; for another dataset (a probe's `_DATASET` names it); and for a run trained on
        another split than evaluations fit on (STL-10's train+unlabeled), whose fingerprint cannot tell its own files
        from others (a probe's checkpoint then refuses other images, as before)."""
        loaded, train_set = self.loaded, self.train_set
        if (loaded.data_folder is None or not same_images(train_set.name, loaded.args.dataset)
                or getattr(loaded.args, "train_split", "train") != train_set.split
                or train_set.fingerprint == loaded.method.info.fingerprint):
            return None
        folder = real_data_folder(train_set.name, self.data_path)
        return None if folder == loaded.data_folder else f"{folder_name(folder)}-{train_set.fingerprint[:8]}"

    def view_words(self, scored_set: ImageSet | None = None) -> str:
        return view_words(self.loaded.method.eval_view, scored_set or self.test_set)

    def view_tags(self, args: argparse.Namespace) -> list[str]:
        return asked_view_tags(args, self.own_view, self.own_resize)

    def asked_view(self, args: argparse.Namespace) -> dict:
        return asked_view(args, self.own_view, self.own_resize)


def open_evaluation(args: argparse.Namespace, device: torch.device, with_test_split: bool = True) -> Evaluation:
    """Load the run named by --run; --dataset / --data_path override the run's own (the split sizes must fit).
    Without `with_test_split` (k-means fitted on and scoring the training split) its test_set is None: an image
    folder of train/ alone is scored so."""
    from ..data import DATASETS, load

    if not args.run:
        raise ConfigError("--run RUN_DIR is required (a directory written by main_pretrain.py or main_cluster.py)")
    loaded = load_run_on_every_rank(args.run, args.checkpoint, device)
    own_view, own_resize = loaded.method.eval_view, loaded.args.eval_resize
    for flag in ("eval_crop", "eval_resize"):  # the evaluation's own test view, where it gives one
        if getattr(args, flag):
            setattr(loaded.args, flag, getattr(args, flag))
    dataset = args.dataset or loaded.args.dataset
    # The run's data path for the run's files (cifar100_20 reads cifar100's); digits read none: a run trained by a
    # script that passed one anyway has it recorded.
    own_files = (not args.data_path and same_images(dataset, loaded.args.dataset)
                 and dataset in DATASETS and DATASETS[dataset].reads_files)
    data_path = loaded.args.data_path if own_files else args.data_path
    train_set = load(dataset, "train", data_path, args.download)
    test_set = load(dataset, "test", data_path, args.download) if with_test_split else None
    if own_files:
        _refuse_other_files(loaded, dataset, train_set, data_path)
    if train_set.channels != loaded.method.info.channels:
        raise ConfigError(f"--dataset {dataset!r} has {train_set.channels}-channel images; the run's model takes "
                          f"{loaded.method.info.channels}")
    _refuse_unusable_view(args, train_set)
    if distributed.rank() == 0:
        _note_other_images(loaded, dataset, train_set, data_path)
    return Evaluation(loaded, train_set, test_set, own_view, own_resize, data_path)


def _note_other_images(loaded: LoadedRun, dataset: str, train_set: ImageSet, data_path: str | None) -> None:
    """A note where the run is scored on other images than it trained on: another dataset (a transfer may be meant,
    a slip of --dataset more often: said, as main_cluster.py's --pretrained says it); another folder of the run's
    dataset, whose training split is not the run's (a copy, a job's local one, has its file names and labels: its
    fingerprint); the run's own folder, changed since it trained (images added, removed or renamed)."""
    trained_on, scored_on = loaded.args.dataset, dataset
    if same_images(dataset, loaded.args.dataset):
        # (compared where they may be: the same dataset, cifar100_20 relabelling cifar100's images)
        if (loaded.data_folder is None or dataset != loaded.args.dataset or not _fingerprints_compare(loaded, train_set)
                or loaded.method.info.fingerprint == train_set.fingerprint):
            return
        here = real_data_folder(dataset, data_path)
        if here == loaded.data_folder:
            print(f"note: the {train_set.split} split of {dataset} in {here} has changed since run "
                  f"{str(loaded.run_dir)!r} trained on it (its file names or labels): it is scored on the files as "
                  f"they are now", flush=True)
            return
        trained_on, scored_on = f"{trained_on} {loaded.data_folder}", f"{dataset} {here}"
    info = loaded.method.info
    print(f"note: run {str(loaded.run_dir)!r} was trained on {trained_on} and is scored on {scored_on}: its images "
          f"take the {loaded.method.eval_view.crop} px test view and the run's mean {list(info.mean)}, std "
          f"{list(info.std)}", flush=True)


def _fingerprints_compare(loaded: LoadedRun, train_set: ImageSet) -> bool:
    """Whether the run's training-set fingerprint can tell whether `train_set` holds its training images: one was
    recorded, and `train_set` is the split the run trained on (not STL-10's train against its train+unlabeled)."""
    return bool(loaded.method.info.fingerprint) and getattr(loaded.args, "train_split", "train") == train_set.split


def _refuse_other_files(loaded: LoadedRun, dataset: str, train_set: ImageSet, data_path: str | None) -> None:
    """Scoring a run on its own data (no --data_path), refuse files other than those it trained on: a relative
    --data_path (as runs recorded it before they recorded it absolute), or DATASET_PATH, read from another working
    directory, named another folder there, scored as the run's data without a word. Files elsewhere with the run's
    training set's names and labels (its fingerprint: a copy, each job's own, say) are the run's; a run trained on
    another split than the one evaluations fit on (STL-10's train+unlabeled) is compared by folder alone."""
    here = real_data_folder(dataset, data_path)
    if loaded.data_folder is None or here == loaded.data_folder:
        return
    if _fingerprints_compare(loaded, train_set) and loaded.method.info.fingerprint == train_set.fingerprint:
        return
    read = f"its --data_path {data_path!r}" if data_path else "its dataset's path ($DATASET_PATH, or ./data)"
    raise ConfigError(f"--run {str(loaded.run_dir)!r} trained on the files in {loaded.data_folder}; {read} reads "
                      f"{here} from here, which does not hold that training set (its file names and labels): give "
                      f"--data_path (that folder, or other images to score the run on)")


def _refuse_unusable_view(args: argparse.Namespace, images: ImageSet) -> None:
    """The test view asked for of `images`, an evaluation's or a baseline's: --eval_resize on an in-memory set
    changed nothing but the name of a linear probe's folder (a second, identical probe trained); a view above
    MAX_UPSCALE times the images' size ran out of memory."""
    if args.eval_resize and images.in_memory:
        raise ConfigError(f"--eval_resize {args.eval_resize}: {images.name} is seen whole, resized to the test view's "
                          f"crop (--eval_crop); the resize before the crop applies to image folders: leave it out")
    refuse_oversized({"--eval_crop": args.eval_crop, "--eval_resize": args.eval_resize}, images.image_size)


def refuse_output_dir_of_a_run(args: argparse.Namespace) -> None:
    """--output_dir scoring a run (not a --baseline): it was ignored, the record going to the run's metrics.jsonl."""
    if args.output_dir and not args.baseline:
        raise ConfigError(f"--output_dir {args.output_dir!r} is where a --baseline's record goes; a run's go to its "
                          f"own metrics.jsonl: leave --output_dir out")


def open_pixel_baseline(args: argparse.Namespace, scored_split: str = "test"):
    """(record directory, run-like args, train split, scored split) for `--baseline pixels`."""
    from ..data import load

    if not args.dataset or not args.output_dir:
        raise ConfigError("--baseline pixels needs --dataset NAME and --output_dir DIR")
    if args.run:
        raise ConfigError(f"--baseline pixels scores no run (--run {args.run!r}): leave --run out; the record goes "
                          f"to --output_dir")
    # A run's flags, which would otherwise be dropped without a word.
    # (--skip_recorded looks up a run's records of its own data: a baseline names its data, so it is scored again)
    for flag, value, meaningful in (("checkpoint", args.checkpoint, {None}), ("features", args.features, {"backbone"}),
                                    ("assignment", getattr(args, "assignment", "auto"), {"auto", "kmeans"}),
                                    ("skip_recorded", "true" if args.skip_recorded else None, {None})):
        if value not in meaningful:
            raise ConfigError(f"--baseline pixels scores no run, so --{flag} {value!r} means nothing: leave it out")
    train_set = load(args.dataset, "train", args.data_path, args.download)
    _refuse_unusable_view(args, train_set)
    scored_set = load(args.dataset, scored_split, args.data_path, args.download)
    run_args = argparse.Namespace(method="pixels", dataset=args.dataset, arch=None, width=None,
                                  seed=getattr(args, "seed", None))
    return Path(args.output_dir), run_args, train_set, scored_set
