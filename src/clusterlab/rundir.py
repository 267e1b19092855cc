"""The run directory's small files: status.json, the JSON-lines logs, the writer's lock, and tidying after a crash.

Every program talks to the others through a run directory (docs/architecture.md); this module owns the files that
are not checkpoints:

- status.json: {"state": running | interrupted | failed | finished, "updated": ..., and fields such as the epoch or
  the one-line reason of a failure}, replaced atomically.
- train_log.jsonl and metrics.jsonl: one JSON object per line, appended whole under an exclusive lock, so
  evaluations running side by side never interleave their lines (a line a crash cut short is ended first).
- .lock: who trains in this directory (host, pid, Slurm job id). A second writer is refused with one line naming
  the holder; a stale lock (a dead process on this host, a Slurm job that is no longer running, or the same Slurm
  job requeued) is taken over.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import socket
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from .checkpoint import FILE_MODE, atomic_write_text
from .errors import ConfigError
from .slurm import job_id as slurm_job_id

LOCK_NAME = ".lock"
# Taking over a stale lock happens under this one; held for a read and an unlink, so an older one is a killed start's.
TAKEOVER_NAME = ".lock.takeover"
TAKEOVER_STALE_S = 30.0


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def append_jsonl(path: str | os.PathLike, record: dict, durable: bool = False) -> None:
    """Append one line; the lock and the O_APPEND write keep concurrent writers' lines whole. A line that a crash
    cut short is ended first, so that only it is lost, not the record after it. A disk that takes only part of the
    line (Linux then returns a short count, and the next write says why) gets the file back as it was, and the
    error names the file. `durable` waits until the line is on disk (evaluation records: minutes of work each)."""
    line = (json.dumps(record) + "\n").encode()
    fd = _open_locked(path)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        try:
            written = 0
            while written < len(line):
                count = os.write(fd, line[written:])
                if count == 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                written += count
        except OSError as err:
            os.ftruncate(fd, size)
            raise OSError(err.errno, err.strerror, os.fspath(path)) from None
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def _open_locked(path: str | os.PathLike) -> int:
    """`path` opened for appending (created if missing) under an exclusive flock. The file may have been replaced
    while this process waited for the lock (`move_jsonl_lines` renames a new file into place): the lock is then on
    the old one, and the file at `path` is opened again."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def move_jsonl_lines(path: str | os.PathLike, to: str | os.PathLike, should_move) -> int:
    """Move the lines of JSON-lines file `path` whose record `should_move(record)` accepts to the end of `to`;
    returns how many. Under the writers' lock, so that no line appended meanwhile is lost; the moved lines reach `to`
    (on disk) before `path` is replaced atomically, so that a crash loses none (it may leave them in both)."""
    if not Path(path).is_file():
        return 0
    fd = _open_locked(path)
    try:
        with os.fdopen(os.dup(fd), "rb") as handle:
            lines = handle.read().decode(errors="replace").splitlines()
        moved, kept = [], []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict) and should_move(record):
                moved.append(record)
            else:
                kept.append(line)
        if moved:
            for record in moved:
                append_jsonl(to, record, durable=True)
            atomic_write_text(path, "".join(line + "\n" for line in kept))
        return len(moved)
    finally:
        os.close(fd)


def is_number(value) -> bool:
    """Whether a value read from a JSON record is a number (a JSON true or false is a Python int too)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines file; a line cut short by a crash, or one that is not a JSON object, is skipped
    (bytes that are not UTF-8 become U+FFFD, so only their line is lost)."""
    return read_jsonl_and_damage(path)[0]


def read_jsonl_and_damage(path: str | os.PathLike) -> tuple[list[dict], list[int]]:
    """read_jsonl's records, and the numbers (from 1) of the lines it skipped that a crash does not explain: a last
    line without its newline is one cut short (or still being written), the line after it begins with a record."""
    try:
        text = Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return [], []
    lines = text.splitlines()
    records, skipped = _parse_lines(lines)
    if skipped and skipped[-1] == len(lines) and not text.endswith("\n"):
        skipped.pop()
    return records, skipped


def _parse_lines(lines: list[str]) -> tuple[list[dict], list[int]]:
    """The JSON objects among `lines`, and the numbers (from 1) of the other lines that are not blank."""
    records, skipped = [], []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif line.strip():
            skipped.append(number)
    return records, skipped


def position_words(epoch, step, steps_per_epoch: int | None = None) -> str:
    """A position in training (epochs and steps done, as status.json and checkpoints count it) in the words of the
    progress lines, which count from 1: (3, 0) is "the end of epoch 3", (2, 5) "epoch 3 step 5" (five steps of the
    third epoch done, as a progress line "epoch 3/E step 5/S" says; "step 5/S" where `steps_per_epoch` is known),
    (0, 0) "the start". Values that are not whole numbers (a hand-edited record) are shown as they are."""
    if not all(isinstance(value, int) and not isinstance(value, bool) for value in (epoch, step)):
        return f"epoch {epoch} step {step}"
    if step == 0:
        return f"the end of epoch {epoch}" if epoch else "the start"
    return f"epoch {epoch + 1} step {step}" + (f"/{steps_per_epoch}" if steps_per_epoch else "")


def write_status(run_dir: str | os.PathLike, state: str, **fields) -> None:
    atomic_write_text(Path(run_dir) / "status.json", json.dumps({"state": state, "updated": now_iso(), **fields}) + "\n")


def read_status(run_dir: str | os.PathLike) -> dict:
    """status.json, or {} where it is missing, unreadable or not a JSON object (a hand-edited file: its readers
    ask it for fields)."""
    try:
        status = json.loads((Path(run_dir) / "status.json").read_text())
    except (OSError, ValueError):
        return {}
    return status if isinstance(status, dict) else {}


def truncate_train_log(run_dir: str | os.PathLike, epoch: int, global_step: int) -> None:
    """Drop the records a crashed run wrote after the checkpoint it resumes from (epoch, global_step): the resumed
    run writes them again, and the log must read like an uninterrupted run's."""
    path = Path(run_dir) / "train_log.jsonl"
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    records, _ = _parse_lines(lines)

    def before_resume_point(record: dict) -> bool:
        if "global_step" in record and not record.get("epoch_end"):
            return record["global_step"] <= global_step
        return record.get("epoch", -1) < epoch

    kept = [r for r in records if before_resume_point(r)]
    if len(kept) != len(lines):  # records after the resume point, or a line cut short
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def remove_leftovers(run_dir: str | os.PathLike) -> None:
    """Remove the temporary files of atomic writes that a killed process left behind (only the lock holder calls
    this): in the run directory, and beside the file a linked checkpoint names (a write through the link puts its
    temporary file there)."""
    for tmp in Path(run_dir).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
    for link in Path(run_dir).glob("checkpoint*.pth"):
        if link.is_symlink():
            target = Path(os.path.realpath(link))
            # (mkstemp's 8 characters: not the temporary files of a sibling named like `{target.name}.2`)
            for tmp in target.parent.glob(f".{glob.escape(target.name)}.????????.tmp"):
                tmp.unlink(missing_ok=True)


# ---- the writer's lock ---------------------------------------------------------------------------------------------

def _holder_of_this_process() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": slurm_job_id(), "since": now_iso()}


def _pid_in_job(pid: int, job: str) -> bool:
    """Whether process `pid` runs in Slurm job `job` (its environment says so); True when it cannot be told.

    An empty environment cannot tell: a process in the middle of exec shows none for a moment.
    """
    try:
        entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return True
    environ = dict(entry.decode(errors="replace").split("=", 1) for entry in entries if b"=" in entry)
    return not environ or slurm_job_id(environ) == job


def _slurm_job_alive(job_id: str) -> bool | None:
    """True/False when squeue can tell whether the job is pending or running; None when it cannot be asked."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        # squeue exits non-zero for a job id it no longer knows
        return False if "Invalid job id" in out.stderr else None
    return bool(out.stdout.strip())


def _pid_alive(pid: int) -> bool:
    """Whether `pid` runs on this host; a zombie (dead, not yet reaped by its parent) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2:][:1] != "Z"


def _stale(holder: dict) -> bool:
    job = holder.get("slurm_job_id")
    if holder.get("host") == socket.gethostname() and holder.get("pid"):
        # First the process itself: two programs started in one allocation share its job id, and both live. This very
        # job requeued onto this node may find its old pid reused, by a process outside the job.
        pid = holder["pid"]
        if pid == os.getpid() or not _pid_alive(pid):
            return True
        # A live pid outside the holder's job is a reused one (this job requeued onto this node, or any other job's
        # process after the holder died: inside containers pids come round again soon).
        return bool(job) and not _pid_in_job(pid, job)
    if job and job == slurm_job_id():
        return True  # this very job, requeued onto another node: its earlier start is gone
    if job:
        return _slurm_job_alive(job) is False
    return False


# The way around a run directory another process holds, for a training program's (a probe's says its own).
TRAINING_ELSEWHERE = "use another --output_dir"


def make_folder(path: str | os.PathLike, what: str, elsewhere: str) -> None:
    """`mkdir -p path`; where no folder can be made there (a file system such as /proc, a parent removed meanwhile)
    one line naming the folder (`what`) and the way out (`elsewhere`)."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except FileNotFoundError as err:
        raise ConfigError(f"cannot create the {what} {str(path)!r} ({err.strerror}): {elsewhere}") from None


class RunLock:
    """Exclusive right to write a run directory, held by rank 0 of the training program for its whole life."""

    def __init__(self, run_dir: str | os.PathLike, elsewhere: str = TRAINING_ELSEWHERE, what: str = "run directory"):
        self.path = Path(run_dir) / LOCK_NAME
        self.held = False
        self.elsewhere = elsewhere  # the way around a directory in use, in its holder's message
        self.what = what  # the directory's kind, in the messages

    def acquire(self) -> None:
        make_folder(self.path.parent, self.what, self.elsewhere)
        me = json.dumps(_holder_of_this_process()) + "\n"
        for _ in range(3):
            if self._create(me):
                self.held = True
                return
            seen, holder = self._read()
            if seen is None:
                continue  # released while we looked
            if holder is None or _stale(holder):
                if self._remove_if_unchanged(seen):  # said: a job's log otherwise showed no sign of the earlier start
                    earlier = _describe(holder) if holder else "a start that died while it wrote the lock"
                    print(f"note: the lock of {self.what} {str(self.path.parent)!r} was held by {earlier}, which no "
                          f"longer runs: taken over", flush=True)
                continue
            raise ConfigError(f"{self.what} {str(self.path.parent)!r} is in use by {_describe(holder)}; "
                              f"wait for it, stop it, or {self.elsewhere}")
        raise ConfigError(f"could not take the lock {str(self.path)!r}: another process keeps taking it")

    def _create(self, text: str) -> bool:
        """Create the lock holding `text`; False when it exists (or may: the caller reads it). Written beside it,
        then linked to its name (a link fails where the name exists): another process never reads a lock
        half-written, which it would take for a crashed holder's. Where the file system has no hard links, created
        in place (exclusive create, then written)."""
        fd, aside = tempfile.mkstemp(prefix=f"{LOCK_NAME}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
            os.chmod(aside, FILE_MODE)  # readable by whoever may share the directory
            os.link(aside, self.path)
            return True
        except (FileExistsError, FileNotFoundError):  # taken; or our copy removed by the holder's remove_leftovers
            return False
        except OSError as err:
            if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            return self._create_in_place(text)
        finally:
            Path(aside).unlink(missing_ok=True)

    def _create_in_place(self, text: str) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
        except OSError:
            self.path.unlink(missing_ok=True)  # a full disk: leave no empty lock behind
            raise
        return True

    def _read(self) -> tuple[bytes | None, dict | None]:
        """The lock's bytes (None when there is no lock) and its holder (None when nobody can hold it: a lock cut
        short by a crash while it was written, or not one this code wrote)."""
        try:
            seen = self.path.read_bytes()
        except FileNotFoundError:
            return None, None
        except OSError:
            return b"", None
        try:
            holder = json.loads(seen)
        except ValueError:
            return seen, None
        return seen, holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None

    def _remove_if_unchanged(self, stale: bytes) -> bool:
        """Remove the lock if it still is the stale one read (`stale`); whether it did. Two starts may find a lock
        stale at once (the squeue call takes seconds): unlinking it, the later one removed the lock the earlier had
        just written, and both held the directory. So removals take turns under a second lock (TAKEOVER_NAME, an
        exclusive create) and remove the lock only if, read again under it, it is still the stale one: the lock of a
        live holder is never moved or removed, even for a moment."""
        guard = self.path.with_name(TAKEOVER_NAME)
        deadline = time.monotonic() + 2 * TAKEOVER_STALE_S
        while True:
            try:
                os.close(os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
                break
            except FileExistsError:
                with contextlib.suppress(OSError):
                    if time.time() - guard.stat().st_mtime > TAKEOVER_STALE_S:
                        guard.unlink()  # left by a start killed between its read and its unlink
                        continue
                if time.monotonic() > deadline:
                    raise ConfigError(f"could not take over the stale lock {str(self.path)!r}: {str(guard)!r} stays "
                                      f"(remove it if no start of this run directory is running)") from None
                time.sleep(0.05)
        try:
            with contextlib.suppress(FileNotFoundError):
                if self.path.read_bytes() == stale:
                    self.path.unlink()
                    return True
            return False
        finally:
            guard.unlink(missing_ok=True)

    def release(self) -> None:
        """Remove the lock if this process holds it. A lock that cannot be removed (the directory turned read-only,
        the disk gone) stays, to be taken over as stale: an error here would replace the one that ended the run."""
        if self.held:
            holder = self._read()[1] or {}
            if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                with contextlib.suppress(OSError):
                    self.path.unlink(missing_ok=True)
            self.held = False


def in_use_by(run_dir: str | os.PathLike) -> str | None:
    """Who holds `run_dir`'s lock, where that holder still lives (a process on this host, a Slurm job still queued);
    None when the directory is free to take."""
    _, holder = RunLock(run_dir)._read()
    return _describe(holder) if holder is not None and not _stale(holder) else None


def lock_holder(run_dir: str | os.PathLike) -> str | None:
    """Who `run_dir`'s lock names, alive or not (no squeue call: for a directory already found in use)."""
    _, holder = RunLock(run_dir)._read()
    return _describe(holder) if holder is not None else None


def _describe(holder: dict) -> str:
    job = f", Slurm job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}{job} since {holder.get('since', '?')}"

