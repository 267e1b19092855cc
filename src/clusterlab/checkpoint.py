"""Checkpoints that are written atomically and read safely.

A checkpoint is a dict of tensors and plain Python values tagged with `format`, `schema` and `kind`, saved with
torch.save to a temporary file in the same directory and renamed over the target, so a crash mid-write never
leaves a half-written checkpoint.pth. Loading always uses `weights_only=True` and refuses files that are
truncated, not ours, of another kind, or of another method, with one line that says which.
"""
from __future__ import annotations

import hashlib
import io
import os
import random
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import distributed
from .errors import CheckpointError, printable

FORMAT = "clusterlab"
SCHEMA = 1


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files 0600; the run directory's files get what the user's umask gives any new file.
FILE_MODE = 0o666 & ~_umask()


def _atomic_write(path: Path, data: bytes, through_links: bool = True) -> None:
    """Write `data` to a temporary file beside `path`, flush it to disk, then rename it over `path`.

    The bytes are complete before the file is opened, so a full disk or a read-only mount surfaces as one OSError
    here and the previous file stays as it was. A link (a checkpoint.pth kept on a scratch area) stays a link: the
    file it names is replaced; with `through_links` False (an output such as a table or a plot, which a link to a
    file of one's own, or to a device, must not put in its place) the link is."""
    if through_links and path.is_symlink():
        path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.filename in (tmp, None):
            raise OSError(err.errno, err.strerror, str(path)) from None  # name the file the user knows
        raise


def copy(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Atomically copy a checkpoint file (temp file beside the target, then rename)."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str, through_links: bool = True) -> None:
    # (a name read from the file system, such as a run's path in a table, may hold bytes that are not UTF-8)
    _atomic_write(Path(path), text.encode(errors="backslashreplace"), through_links)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, through_links: bool = True) -> None:
    _atomic_write(Path(path), data, through_links)


def save(state: dict, path: str | os.PathLike | list, *, kind: str, method: str) -> None:
    """Atomically write `state` with its tags (`kind` is pretrain, cluster or linear) to `path`, or to each of a
    list of paths in order (serialised once)."""
    payload = {"format": FORMAT, "schema": SCHEMA, "kind": kind, "method": method, **state}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    for target in path if isinstance(path, list) else [path]:
        _atomic_write(Path(target), buffer.getbuffer())


def _checkpoints_beside(path: Path) -> str:
    """'; FOLDER has NAMES': the checkpoint files of the missing `path`'s folder, the last four by name where there
    are more (the latest epochs; checkpoint.pth sorts first); '' where the folder itself is missing."""
    folder = path.parent
    if not folder.is_dir():
        return ""
    present = sorted(printable(file.name) for file in folder.glob("*.pth") if file.is_file())
    shown = (f"{len(present) - 4} more, then " if len(present) > 4 else "") + ", ".join(present[-4:])
    none = "no checkpoint yet" if (folder / "config.yaml").is_file() else "no checkpoint file"
    return f"; {str(folder)!r} has {shown or none}"


def damaged_entry(path: Path) -> str | None:
    """The first entry of a checkpoint's zip archive whose bytes fail the CRC-32 the archive keeps of them, else
    None: torch.load does not check them, so bytes changed in place (a failing disk, a bad copy) loaded as other
    weights, and training and evaluations went on from them without a word."""
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip()
    except zipfile.BadZipFile as err:
        return str(err)


def epoch_checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint_epNNNN.pth files, earliest first."""
    return sorted(run_dir.glob("checkpoint_ep[0-9][0-9][0-9][0-9].pth"))


def _epoch_checkpoint_beside(path: Path) -> str:
    """For an unreadable checkpoint.pth, the latest epoch checkpoint of its run to go on from (as the NaN guard's
    message names it); '' for any other file or where there is none."""
    if path.name != "checkpoint.pth":
        return ""
    epochs = epoch_checkpoints(path.parent)
    return (f"; {epochs[-1].name} beside it is the run's latest epoch checkpoint: copy it over checkpoint.pth to go "
            f"on from there" if epochs else "")


def load(path: str | os.PathLike, *, kind: str | tuple[str, ...] | None = None, method: str | None = None,
         map_location: Any = "cpu", mmap: bool = False) -> dict:
    """Load and validate a checkpoint; `kind`/`method` given means a mismatch is refused. `mmap`: tensors are read
    from the file only when touched."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is a directory, not a checkpoint file")
    if path.is_symlink() and not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} links to {os.readlink(path)!r}, which does not exist (a "
                              f"scratch area purged?)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist{_checkpoints_beside(path)}")
    try:
        with warnings.catch_warnings():  # torch warns (two lines) about a pickle of another protocol before refusing it
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            payload = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises several types for truncated or foreign files
        if mmap:  # torch maps its zip format only: read without mapping, which names what is wrong with the file
            return load(path, kind=kind, method=method, map_location=map_location)
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt or not a torch file "
                              f"({unreadable_reason(path, err)}){_epoch_checkpoint_beside(path)}") from None
    damaged = None if mmap else damaged_entry(path)  # (a memory-mapped load reads a few fields, not the weights)
    if damaged:  # (before the tags: a changed byte of the format tag is a damaged file, not a foreign one)
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: the bytes of its entry {damaged!r} fail the "
                              f"checksum the file keeps of them (changed on disk or in a copy)"
                              f"{_epoch_checkpoint_beside(path)}")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a clusterlab checkpoint (no format tag)")
    if payload.get("schema") != SCHEMA:
        raise CheckpointError(f"checkpoint {str(path)!r} has schema {payload.get('schema')!r}; "
                              f"this version reads schema {SCHEMA}")
    kinds = (kind,) if isinstance(kind, str) else kind
    if kinds is not None and payload.get("kind") not in kinds:
        raise CheckpointError(f"checkpoint {str(path)!r} is a {payload.get('kind')!r} checkpoint; "
                              f"expected {' or '.join(kinds)}")
    if method is not None and payload.get("method") != method:
        raise CheckpointError(f"checkpoint {str(path)!r} was written by method {payload.get('method')!r}, "
                              f"not {method!r}; use a fresh --output_dir for a different method")
    return payload


def first_non_finite(tensors: dict) -> str | None:
    """The name of the first floating tensor of `tensors` (a state dict) holding a NaN or an infinity, else None."""
    return next((name for name, value in tensors.items() if torch.is_tensor(value) and value.is_floating_point()
                 and not bool(torch.isfinite(value).all())), None)


def non_finite_rows(values: torch.Tensor) -> int:
    """How many rows of `values` (one per image: features, logits, class ids) hold a NaN or an infinity: weights
    that are finite may still overflow in the forward pass."""
    finite = torch.isfinite(values).flatten(1).all(dim=1) if values.dim() > 1 else torch.isfinite(values)
    return int((~finite).sum())


def weights_digest(module: torch.nn.Module) -> str:
    """A digest of a module's weights and buffers (names and bytes, in their logical order whatever the memory
    layout): what a probe of them keeps, to tell when the checkpoint it probed was replaced by other weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def require_finite_weights(state: dict, path: str | os.PathLike) -> None:
    """Refuse a checkpoint whose model holds a NaN or an infinity: training never saves one (engine.Trainer.save), so
    the file was edited or written elsewhere, and its evaluation would score chance or fail inside k-means."""
    name = first_non_finite(state["model"]) if isinstance(state.get("model"), dict) else None
    if name is not None:
        raise CheckpointError(f"checkpoint {str(path)!r} holds non-finite weights ({name}); training never saves "
                              f"such weights: take an earlier checkpoint of the run")


def unreadable_reason(path: Path, err: Exception) -> str:
    """Why torch.load could not read `path`, in the file's terms where its first bytes tell (torch says "[Errno 22]
    Invalid argument" of an archive cut short, and "legacy .tar format" of zeros), else torch's own words."""
    try:
        with open(path, "rb") as file:
            head = file.read(4)
    except OSError:
        return failure_reason(err)
    if head == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        return "truncated: a zip archive without its end, as a write cut short or a copy stopped early leaves"
    if head and head != b"PK\x03\x04" and head[:1] != b"\x80":
        return "its first bytes are neither a zip archive's nor a pickle's"
    return failure_reason(err)


def failure_reason(err: Exception) -> str:
    """Why a checkpoint could not be read (torch.load) or does not fit a model (load_state_dict), in one short line:
    the first sentence of the line of torch's message that names the problem.

    For a weights_only refusal torch starts with advice that is the same whatever the file holds; the line after
    "WeightsUnpickler error:" (or after that advice) names what was refused. A state-dict error starts with a
    heading line ("Error(s) in loading state_dict for ..."); the line after it names what differs. A missing entry
    of a checkpoint is a KeyError."""
    if isinstance(err, KeyError):
        return f"no entry {err}"
    text = str(err)
    if text.startswith("Weights only load failed"):
        rest = text.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in text \
            else text.split("\n", 1)[-1]
        boilerplate = ("Please file an issue", "Check the documentation", "(1)", "(2)")
        details = [line for line in map(str.strip, rest.splitlines()) if line and not line.startswith(boilerplate)]
        text = f"weights_only refused it: {details[0] if details else 'unsupported content'}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading"):
        lines = lines[1:]
    return (lines[0].split(". ")[0] if lines else type(err).__name__)[:200]


def rng_state() -> dict:
    """Every global random state a run touches, in a form weights_only loading accepts."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gauss": float(np_state[4])},
        "python": _python_state_to_plain(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def every_ranks_torch_generators() -> torch.Tensor:
    """Collective: each rank's torch generator states (CPU, then CUDA's where initialised) as one uint8 row, (world,
    bytes) in rank order. The ranks' global generators part ways where a rank draws for its own share (dropout over
    a share of uneven size): restored per rank, a run resumed on as many processes draws as it would have."""
    several = distributed.is_initialized()
    # CUDA's state under NCCL only when several: decided alike on every rank, so that the rows have one length
    cuda = (distributed.collective_device().type == "cuda" if several
            else torch.cuda.is_available() and torch.cuda.is_initialized())
    row = torch.cat([torch.get_rng_state(), *([torch.cuda.get_rng_state()] if cuda else [])]).unsqueeze(0)
    return distributed.all_gather_cat(row.to(distributed.collective_device())).cpu() if several else row


def set_torch_generators(row: torch.Tensor) -> None:
    """This rank's row of every_ranks_torch_generators."""
    cpu = torch.get_rng_state().numel()
    torch.set_rng_state(row[:cpu].clone())
    if row.numel() > cpu and torch.cuda.is_available():
        torch.cuda.set_rng_state(row[cpu:].clone())


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state["name"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gauss"]))
    random.setstate(_plain_to_python_state(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _python_state_to_plain(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _plain_to_python_state(state: list) -> tuple:
    version, internal, gauss = state
    return version, tuple(internal), gauss

