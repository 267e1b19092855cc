"""Global batches: the order of a run's samples depends on (seed, epoch) only, never on the world size.

Each epoch is a permutation of the dataset drawn once from (seed, epoch); step s takes the s-th global batch of it
and rank r keeps the r-th contiguous slice. One process with the global batch therefore sees exactly the samples
that W processes see together, and a run resumed in the middle of an epoch continues with the same batches.

In-memory sets are copied to the training device once and indexed there (no host-to-device copy of images per
step). Image files go through loader worker processes that decode and cut the crops (files.py); the crop
parameters are drawn here, ahead of the step, from the augmentation's generator, so the crops do not depend on the
world size or the number of workers either. The training loader's workers persist across epochs; on CUDA their
batches come in pinned memory and are copied with non_blocking. The workers ignore the stop signals but their main
process's SIGTERM: Slurm signals every process of a step, and a worker that died of it would fail the step the main
process is saving.

Unreadable files: each is replaced by the next readable file of the dataset (files.py), reported on one line the
first time it is met, and counted; after each epoch rank 0 prints the count and appends it to train_log.jsonl
(`bad_files`). When an epoch's count passes BAD_FILE_LIMIT of its samples (checked over all ranks every
BAD_FILE_CHECK_EVERY steps and at the end of the epoch) training stops with a DataError. A file that cannot be used
at all (no readable substitute, 32-bit samples) stops every rank at once: with several processes the check runs at
every step, so that the other ranks do not wait in the next collective for the one that stopped.
"""
from __future__ import annotations

import functools
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import signal
import threading
from pathlib import Path
from typing import Iterator

import torch

from .. import distributed, rundir, signals
from ..errors import ConfigError, DataError
from .augment import CropSpec, CutCrops, EvalView, MultiCrop
from .files import CropJob, FileSource, ViewJob
from .registry import ImageSet

BAD_FILE_LIMIT = 0.01
BAD_FILE_CHECK_EVERY = 50
# An in-memory set is kept on a CUDA device when it takes at most this share of the device's free memory.
RESIDENT_SHARE = 0.25


class GlobalBatches:
    def __init__(self, num_samples: int, global_batch: int, world_size: int, rank: int, seed: int,
                 shuffle: bool = True, drop_last: bool = True):
        if global_batch % world_size and drop_last:  # training's batches split evenly; a pass over all may not
            nearest = max(world_size, round(global_batch / world_size) * world_size)
            if nearest > num_samples:  # (a suggestion refused next as larger than the dataset)
                nearest = max(world_size, num_samples // world_size * world_size)
            raise ConfigError(f"--batch_size {global_batch} (global) is not a multiple of the world size {world_size}: "
                              f"give a multiple of {world_size} (e.g. {nearest}), or run on a number of processes "
                              f"that divides {global_batch}")
        if drop_last and num_samples < global_batch:
            raise ConfigError(f"--batch_size {global_batch} is larger than the dataset ({num_samples} samples)")
        self.num_samples, self.global_batch, self.world_size, self.rank = num_samples, global_batch, world_size, rank
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self._order_epoch, self._order = None, None

    def __len__(self) -> int:
        full, rest = divmod(self.num_samples, self.global_batch)
        return full + (0 if self.drop_last or rest == 0 else 1)

    @property
    def epoch_samples(self) -> int:
        """Samples one epoch uses (drop_last leaves the remainder out)."""
        return min(self.num_samples, len(self) * self.global_batch)

    def order(self, epoch: int) -> torch.Tensor:
        """The epoch's permutation, drawn once per epoch: every step of the epoch slices the same tensor."""
        if self._order_epoch != epoch:
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._order = torch.randperm(self.num_samples, generator=generator)
            else:
                self._order = torch.arange(self.num_samples)
            self._order_epoch = epoch
        return self._order

    def global_indices(self, epoch: int, step: int) -> torch.Tensor:
        return self.order(epoch)[step * self.global_batch: (step + 1) * self.global_batch]

    def local_indices(self, epoch: int, step: int) -> tuple[torch.Tensor, int, int]:
        """This rank's indices of step `step`, the global batch size and this rank's offset inside it: contiguous
        shares, the first ranks one more where the batch does not split evenly."""
        batch = self.global_indices(epoch, step)
        share, extra = divmod(len(batch), self.world_size)
        start = self.rank * share + min(self.rank, extra)
        return batch[start: start + share + (self.rank < extra)], len(batch), start

    def plan(self, epoch: int, start_step: int = 0) -> list[tuple[torch.Tensor, int, int]]:
        """`local_indices` of every step from `start_step` to the end of the epoch: O(N) for the whole epoch."""
        return [self.local_indices(epoch, step) for step in range(start_step, len(self))]


def resident(images: ImageSet, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """An in-memory set's images and labels on `device`, copied there once and kept (in `images.cache`); where a
    CUDA device lacks the room (RESIDENT_SHARE of its free memory) they stay on the host."""
    key = ("resident", str(device))
    if key not in images.cache:
        pixels, labels = images.images, images.labels
        fits = device.type != "cuda" or pixels.nbytes <= RESIDENT_SHARE * torch.cuda.mem_get_info(device)[0]
        images.cache[key] = (pixels.to(device), labels.to(device)) if fits else (pixels, labels)
    return images.cache[key]


def iterate(images: ImageSet, batches: GlobalBatches, epoch: int, start_step: int = 0, workers: int = 0,
            augment: MultiCrop | None = None, device: torch.device | str = "cpu", log: Path | None = None,
            tally: BadFiles | None = None
            ) -> Iterator[tuple[int, torch.Tensor | CutCrops, torch.Tensor, torch.Tensor, int, int]]:
    """Yield (step, images, labels, dataset indices, global batch size, offset) from `start_step` on, on `device`.

    In-memory sets give uint8 images; image files give CutCrops, the crops of `augment` (the method's pipeline,
    which its `__call__` finishes on the device). `log`: the train_log.jsonl that rank 0 appends the epoch's
    unreadable-file count to; `tally`: the epoch's count so far (`BadFiles.for_epoch`; a resumed epoch's carries
    the files met before the stop), by default a new one.
    """
    device = torch.device(device)
    plan = batches.plan(epoch, start_step)
    if not images.in_memory:
        tally = tally or BadFiles.for_epoch(images, batches, device)
        yield from _iterate_files(images, batches, epoch, plan, start_step, workers, augment, device, log, tally)
        return
    pixels, labels = resident(images, device)
    if not plan:
        return
    # The epoch's indices go to the images' device in one piece, not step by step.
    local = torch.cat([idx for idx, _, _ in plan]).to(pixels.device, non_blocking=True)
    for step, idx, (_, total, offset) in zip(range(start_step, len(batches)),
                                             local.split([len(idx) for idx, _, _ in plan]), plan):
        yield (step, pixels[idx].to(device, non_blocking=True), labels[idx].to(device, non_blocking=True),
               idx.to(device, non_blocking=True), total, offset)


def _iterate_files(images, batches, epoch, plan, start_step, workers, augment, device, log, tally):
    """`iterate` over image files: the parameters of each step drawn here (from a copy of the pipeline's
    generator, ahead of the training loop), the crops cut by the persistent workers."""
    loader, jobs = _training_loader(images, workers, device)
    generator = torch.Generator()
    generator.set_state(augment.generator.get_state())
    pending = {}

    def planned():
        for step, (idx, total, offset) in zip(range(start_step, len(batches)), plan):
            params = [p.slice(offset, offset + len(idx)) for p in augment.sample(total, generator)]
            pending[step] = params, generator.get_state(), total, offset
            uniforms = torch.stack([p.uniforms for p in params], dim=1).numpy()
            yield CropJob(step, idx.numpy(), uniforms, tuple(augment.each_crop))

    jobs.current = planned()
    every_step = distributed.world_size() > 1
    for done, result in enumerate(started(loader), start=1):
        if not tally.add(result) or every_step:
            tally.check(f"epoch {epoch + 1} so far")
        params, state, total, offset = pending.pop(result["step"])
        for crop, p in enumerate(params):
            p.boxes = result["boxes"][:, crop]
        crops = CutCrops([c.to(device, non_blocking=True) for c in result["crops"]], params, state)
        yield (result["step"], crops, result["labels"].to(device, non_blocking=True),
               result["indices"].to(device, non_blocking=True), total, offset)
        if not every_step and (done % BAD_FILE_CHECK_EVERY == 0 or done == len(plan)):
            tally.check(f"epoch {epoch + 1} so far")
    tally.report(epoch, log)


class _Jobs:
    """The sampler of a loader whose workers persist: each pass iterates the jobs set for it."""

    def __init__(self):
        self.current = iter(())

    def __iter__(self):
        return self.current


def _training_loader(images: ImageSet, workers: int, device: torch.device):
    """The set's training DataLoader and its job sampler, made once and kept (its workers live across epochs)."""
    key = ("training_loader", workers, device.type)
    if key not in images.cache:
        jobs = _Jobs()
        images.cache[key] = _file_loader(images, jobs, workers, device, persistent=True), jobs
    return images.cache[key]


def _file_loader(images: ImageSet, jobs, workers: int, device: torch.device, persistent: bool = False):
    # batch_size None: each job is one batch, cut by one worker; pinned memory for a CUDA device's non_blocking copy.
    # A generator of its own: the workers' seeds would otherwise be drawn from the global generator, which a
    # checkpoint holds, each time the workers start (the workers themselves draw nothing).
    return torch.utils.data.DataLoader(FileSource(images.files, images.labels, images.channels), sampler=jobs,
                                       batch_size=None, num_workers=workers,
                                       persistent_workers=persistent and workers > 0,
                                       pin_memory=device.type == "cuda", generator=torch.Generator(),
                                       worker_init_fn=functools.partial(_ignore_stop_signals, os.getpid()))


def started(loader: torch.utils.data.DataLoader):
    """iter(loader), with the stop signals blocked in this thread while it starts the workers: a worker starts with
    torch's SIGTERM handler, which kills it, until its worker_init_fn (`_ignore_stop_signals`) runs; Slurm's SIGTERM
    to every process in that window failed the run instead of stopping it. Started with them blocked, a worker never
    takes them before it ignores them; this process takes a pending one when they are unblocked.

    A forkserver's workers are forked by its server: the server is started inside the block, so that it and every
    worker it forks keep the mask; the resource tracker before it, since starting it unblocks SIGTERM."""
    forkserver = loader.num_workers > 0 and \
        (loader.multiprocessing_context or multiprocessing).get_start_method() == "forkserver"
    if forkserver:
        multiprocessing.resource_tracker.ensure_running()
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, set(signals.STOP_SIGNALS))
    try:
        if forkserver:
            multiprocessing.forkserver.ensure_running()
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _ignore_stop_signals(main_pid: int, worker_id: int) -> None:
    """In a loader worker: the main process alone acts on a stop signal (it saves, then its exit ends the workers).
    torch's SIGTERM handler would kill the worker whoever sent it, and the main process's next batch would raise;
    ignoring SIGTERM altogether would keep the worker alive when its main process stops it (torch's and
    multiprocessing's shutdown, the latter waiting for it forever). So SIGTERM is blocked and a thread takes it: a
    worker leaves on its main process's SIGTERM only (`main_pid`: a forkserver, not the main process, is the
    parent of workers it starts)."""
    for signum in signals.STOP_SIGNALS:
        if signum != signal.SIGTERM:
            signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_leave_on_the_main_process_sigterm, args=(main_pid,), daemon=True).start()


def _leave_on_the_main_process_sigterm(main_pid: int) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == main_pid:
            os._exit(0)


class BadFiles:
    """The unreadable files one pass met: each reported on one line the first time this process meets it (in any
    pass), counted over all ranks, limited; and a file that cannot be used at all (`fatal`)."""

    def __init__(self, images: ImageSet, limit: int | None, device: torch.device):
        self.reported = images.cache.setdefault("reported_bad_files", set())
        self.limit, self.device, self.count = limit, device, 0
        self.first: tuple[str, str] | None = None  # (path, reason) of the first unreadable file on this rank
        self.fatal = None

    @classmethod
    def for_epoch(cls, images: ImageSet, batches: GlobalBatches, device: torch.device) -> BadFiles:
        """For a training epoch: at most BAD_FILE_LIMIT of the samples it uses unreadable."""
        return cls(images, limit=int(BAD_FILE_LIMIT * batches.epoch_samples), device=device)

    @classmethod
    def limited(cls, images: ImageSet, device: torch.device) -> BadFiles:
        """For a pass over all of `images` (evaluation, labelling): at most BAD_FILE_LIMIT of them unreadable."""
        return cls(images, limit=int(BAD_FILE_LIMIT * len(images)), device=device)

    def add(self, result: dict) -> bool:
        """Count a loader result's unreadable files; False when it is `fatal` (it then holds no images, and the
        next `check` stops every rank)."""
        if "fatal" in result:
            self.fatal = result["fatal"]
            return False
        for index, path, reason, substitute in result["bad"]:
            self.count += 1
            self.first = self.first or (path, reason)
            if path not in self.reported:
                self.reported.add(path)
                print(f"unreadable image file {path} ({reason}); sample {index} uses {substitute} instead",
                      flush=True)
        return True

    def totals(self) -> tuple[int, bool]:
        """The count over all ranks, and whether some rank met a fatal file (collective)."""
        values = torch.tensor([float(self.count), float(self.fatal is not None)], device=self.device)
        distributed.all_reduce_sum(values)
        total, fatal = values.tolist()
        return int(total), bool(fatal)

    def check(self, where: str) -> None:
        """Collective: every rank raises when some rank met a file that cannot be used, or when the count over all
        ranks passes the limit."""
        total, fatal = self.totals()
        if fatal:
            raise DataError(self.fatal or "an image file cannot be used (another process's error names it)")
        if self.limit is not None and total > self.limit:
            first = f"{self.first[0]} ({self.first[1]})" if self.first else "on another rank"
            raise DataError(f"{total} unreadable image files in {where}, more than {BAD_FILE_LIMIT:.0%} of "
                            f"its samples (first: {first}); fix or remove them")

    def check_pass(self, images: ImageSet) -> None:
        """`check` at the end of a pass over `images` through `sequential` (nothing for an in-memory set, which has
        no files: collective only where every rank reads files)."""
        if not images.in_memory:
            self.check(f"the {images.split_name} split of {images.name}")

    def report(self, epoch: int, log: Path | None) -> None:
        """Collective: rank 0 prints the epoch's count and appends it to `log`."""
        total, _ = self.totals()
        if total and distributed.rank() == 0:
            print(f"epoch {epoch + 1}: {total} unreadable image file(s) replaced by the next readable file of the "
                  f"dataset (each listed once when first met)", flush=True)
            if log is not None:
                rundir.append_jsonl(log, {"epoch": epoch, "bad_files": total, "time": rundir.now_iso()})


def sequential(images: ImageSet, indices: torch.Tensor, batch_size: int | list[int], workers: int = 0,
               device: torch.device | str = "cpu", view: EvalView | None = None,
               crop: tuple[CropSpec, torch.Tensor] | None = None,
               tally: BadFiles | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (uint8 images on `device`, dataset indices) over `indices` in order, `batch_size` at a time (a list:
    batches of those sizes).

    In-memory sets give the images themselves. Image files give the test `view` of each image, or, with `crop` =
    (CropSpec, uniforms of each of `indices`), that random-resized crop, cut by the workers (not flipped). No
    collective runs here: ranks may take different numbers of batches. Unreadable files are counted in `tally`,
    without limit by default; a file that cannot be used raises a DataError, or, given a `tally`, ends the pass
    early, and the caller's collective `tally.check` stops every rank.
    """
    device = torch.device(device)
    chunks = list(torch.split(indices, batch_size))
    if images.in_memory:
        pixels, _ = resident(images, device)
        for idx in chunks:
            yield pixels[idx.to(pixels.device)].to(device, non_blocking=True), idx
        return
    if crop is not None:
        spec, uniforms = crop
        jobs = [CropJob(step, idx.numpy(), u[:, None].numpy(), (spec,))
                for step, (idx, u) in enumerate(zip(chunks, torch.split(uniforms, batch_size)))]
    else:
        jobs = [ViewJob(step, idx.numpy(), view) for step, idx in enumerate(chunks)]
    checked_by_caller = tally is not None
    tally = tally or BadFiles(images, limit=None, device=device)
    for result, idx in zip(started(_file_loader(images, jobs, workers, device)), chunks):
        if not tally.add(result):
            if checked_by_caller:
                return
            raise DataError(tally.fatal)
        yield result["crops"][0].to(device, non_blocking=True), idx
