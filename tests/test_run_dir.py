"""The run directory under abuse: one writer at a time, nothing half-kept after SIGKILL, failures recorded, and
commands that do not fit the run refused before anything is rewritten (rundir.py, engine.py, checkpoint.py)."""
from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from clusterlab import checkpoint, rundir
from clusterlab.errors import ConfigError
from conftest import (PYTHON, ROOT, TINY, TINY_RUN, assert_ok, assert_user_error, copy_run, entry_module, run_script,
                      script_env, snapshot)
from dist_utils import run_distributed


def running(process: subprocess.Popen, program: str) -> None:
    """Wait until `process` runs `program`: Popen returns while exec is still laying out the new arguments and
    environment, which /proc shows empty until then."""
    deadline = time.time() + 30
    while not Path(f"/proc/{process.pid}/cmdline").read_bytes().startswith(program.encode() + b"\0"):
        assert time.time() < deadline, f"{program} did not start"
        time.sleep(0.01)


def lock_holder(run_dir, **fields) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": None, "since": "then", **fields}
    (run_dir / rundir.LOCK_NAME).write_text(json.dumps(holder) + "\n")


# ---- the lock ------------------------------------------------------------------------------------------------------

def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(["sleep", "60"], env={**os.environ, "SLURM_JOB_ID": "4242"})  # alive, in its job
    try:
        running(holder, "sleep")
        lock_holder(run, pid=holder.pid, slurm_job_id="4242")
        before = snapshot(run)
        result = run_script("main_pretrain.py", *TINY, "--output_dir", run)
    finally:
        holder.kill()
        holder.wait()
    assert_user_error(result, "main_pretrain.py", f"{str(run)!r} is in use by pid {holder.pid}",
                      socket.gethostname(), "Slurm job 4242", "another --output_dir")
    assert snapshot(run) == before


def _start_in(rank, world, run_dir):
    from clusterlab import distributed, engine

    try:
        with engine.owned_run_dir(run_dir, distributed.init("cpu")):
            distributed.barrier()  # as training's first collective
            return "trained"
    except ConfigError as err:
        return str(err)


def test_a_refused_start_on_rank_0_stops_every_rank(tmp_path):
    """Only rank 0 takes the lock; without its outcome the others would train alone until their first collective
    waited out the process group's timeout (30 minutes on a cluster)."""
    run = tmp_path / "run"
    lock_holder(run)
    ranks = run_distributed(_start_in, 2, str(run))
    assert f"is in use by pid {os.getpid()}" in ranks[0]
    assert ranks[1] == "rank 0 could not take the run directory (its error names why)"
    assert run_distributed(_start_in, 2, str(tmp_path / "free")) == ["trained", "trained"]


def test_two_runs_started_together_one_trains_the_other_is_refused(tmp_path):
    run = tmp_path / "run"
    command = [PYTHON, str(ROOT / "main_pretrain.py"), *map(str, TINY), "--epochs", "3", "--output_dir", str(run)]
    first = subprocess.Popen([*command, "--seed", "0"], cwd=ROOT, env=script_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (run / rundir.LOCK_NAME).exists() and time.time() < deadline:
        time.sleep(0.01)
    # Paused while the second starts: on a busy machine the first could otherwise finish before the second's
    # interpreter has even started, and then there would be nothing to refuse.
    first.send_signal(signal.SIGSTOP)
    try:
        second = run_script("main_pretrain.py", *TINY, "--epochs", 3, "--seed", 1, "--output_dir", run)
    finally:
        first.send_signal(signal.SIGCONT)
    assert_user_error(second, "main_pretrain.py", f"pid {first.pid}", "is in use")
    first.communicate(timeout=120)
    assert first.returncode == 0
    saved = checkpoint.load(run / "checkpoint.pth")
    assert saved["args"]["seed"] == 0 and saved["epoch"] == 3
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    assert not (run / rundir.LOCK_NAME).exists()


def test_stale_locks_are_taken_over(tmp_path, monkeypatch):
    dead = subprocess.Popen(["true"])
    dead.wait()
    # a dead process on this host
    lock_holder(tmp_path / "a", pid=dead.pid)
    taken = run_script("main_pretrain.py", *TINY, "--epochs", 1, "--output_dir", tmp_path / "a")
    assert_ok(taken)
    # said (a job's log showed no sign of the earlier start)
    assert (f"note: the lock of run directory {str(tmp_path / 'a')!r} was held by pid {dead.pid} on "
            f"{socket.gethostname()}") in taken.stdout and "which no longer runs: taken over" in taken.stdout
    # the same Slurm job, requeued (possibly on another node)
    lock_holder(tmp_path / "b", host="another-node", pid=1, slurm_job_id="77")
    lock = rundir.RunLock(tmp_path / "b")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    lock.acquire()
    assert json.loads((tmp_path / "b" / rundir.LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / "b" / rundir.LOCK_NAME).exists()
    # another node, no Slurm job to ask about: cannot tell, so refused
    lock_holder(tmp_path / "c", host="another-node", pid=1)
    monkeypatch.delenv("SLURM_JOB_ID")
    with pytest.raises(ConfigError, match="in use by pid 1 on another-node"):
        rundir.RunLock(tmp_path / "c").acquire()


def test_a_live_writer_of_the_same_slurm_job_keeps_its_lock(tmp_path, monkeypatch):
    """Two programs in one allocation share SLURM_JOB_ID: the job id alone must not make the other's lock stale."""
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    alive = subprocess.Popen(["sleep", "60"])
    running(alive, "sleep")
    try:
        lock_holder(tmp_path / "live", pid=alive.pid, slurm_job_id="4242")
        with pytest.raises(ConfigError, match=f"in use by pid {alive.pid} .*Slurm job 4242"):
            rundir.RunLock(tmp_path / "live").acquire()
    finally:
        alive.kill()
        alive.wait()
    lock_holder(tmp_path / "gone", pid=alive.pid, slurm_job_id="4242")  # the same job's earlier start, now dead
    rundir.RunLock(tmp_path / "gone").acquire()
    # Requeued onto this node, the job finds its old pid taken by a process outside the job: stale.
    monkeypatch.delenv("SLURM_JOB_ID")
    other = subprocess.Popen(["sleep", "60"])
    running(other, "sleep")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    try:
        lock_holder(tmp_path / "reused", pid=other.pid, slurm_job_id="4242")
        rundir.RunLock(tmp_path / "reused").acquire()
    finally:
        other.kill()
        other.wait()


def test_a_live_pid_outside_the_holders_job_is_a_reused_one(tmp_path, monkeypatch):
    """The holder, Slurm job 555 on this host, is gone; its pid now belongs to a process outside that job. Another
    job (556) takes the lock: it was refused for good, as only the holder's own job was checked against the pid."""
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    reused = subprocess.Popen(["sleep", "60"])
    try:
        running(reused, "sleep")
        lock_holder(tmp_path, pid=reused.pid, slurm_job_id="555")
        monkeypatch.setenv("SLURM_JOB_ID", "556")
        rundir.RunLock(tmp_path).acquire()
        assert json.loads((tmp_path / rundir.LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        reused.kill()
        reused.wait()


def test_a_stale_lock_another_process_took_over_meanwhile_stays_its(tmp_path, monkeypatch):
    """Two processes find a dead holder's lock stale at once (asking squeue takes seconds); the first replaces it
    with its own before the second acts. The second unlinked that fresh lock and wrote its own: both held the
    directory. Now the second reads the lock again before it removes it (under a second lock, so that removals take
    turns): no longer the stale one, it stays, and the second start is refused."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock_holder(tmp_path, pid=dead.pid)
    judge = rundir._stale

    def judged_while_another_takes_over(holder):
        verdict = judge(holder)
        if holder["pid"] == dead.pid:
            (tmp_path / rundir.LOCK_NAME).unlink()
            lock_holder(tmp_path, host="another-node", pid=1)
        return verdict

    monkeypatch.setattr(rundir, "_stale", judged_while_another_takes_over)
    with pytest.raises(ConfigError, match="in use by pid 1 on another-node"):
        rundir.RunLock(tmp_path).acquire()
    assert [p.name for p in tmp_path.iterdir()] == [rundir.LOCK_NAME]


def test_a_takeover_guard_left_by_a_killed_start_does_not_block_the_next(tmp_path):
    """Stale locks are removed under a second lock, held for a read and an unlink: one older than TAKEOVER_STALE_S
    was left by a start killed in between, and is taken over too; a fresh one is waited for."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock_holder(tmp_path, pid=dead.pid)
    guard = tmp_path / rundir.TAKEOVER_NAME
    guard.touch()
    os.utime(guard, (time.time() - rundir.TAKEOVER_STALE_S - 5,) * 2)
    rundir.RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / rundir.LOCK_NAME).read_text())["pid"] == os.getpid()
    assert sorted(p.name for p in tmp_path.iterdir()) == [rundir.LOCK_NAME]


def test_a_holder_whose_environment_cannot_be_read_keeps_its_lock(tmp_path, monkeypatch):
    """A process caught in the middle of exec shows no environment yet: that cannot tell it is outside the job."""
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    bare = subprocess.Popen(["env", "-i", "sleep", "60"])
    try:
        running(bare, "sleep")
        assert Path(f"/proc/{bare.pid}/environ").read_bytes() == b""
        lock_holder(tmp_path, pid=bare.pid, slurm_job_id="4242")
        with pytest.raises(ConfigError, match=f"in use by pid {bare.pid} "):
            rundir.RunLock(tmp_path).acquire()
    finally:
        bare.kill()
        bare.wait()


def test_a_zombie_holder_is_dead(tmp_path):
    """A writer killed but not yet reaped by its parent still answers kill(pid, 0); its lock is stale all the same."""
    zombie = subprocess.Popen(["true"])
    deadline = time.time() + 30
    while Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z" and time.time() < deadline:
        time.sleep(0.01)
    try:
        lock_holder(tmp_path, pid=zombie.pid)
        rundir.RunLock(tmp_path).acquire()
        assert json.loads((tmp_path / rundir.LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        zombie.wait()


# Takes the lock of RUN and prints "held" (keeping it a moment) or the refusal. With a third argument it writes the
# lock slowly, touching that file once it has begun; with a fourth it waits for that file to exist first.
CONTENDER = """
import os, sys, time
from pathlib import Path
from clusterlab import rundir
from clusterlab.errors import ConfigError
run, writing, wait_for = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None, sys.argv[3:] and sys.argv[3]
if wait_for:
    while not Path(wait_for).exists():
        time.sleep(0.001)
elif writing:
    real_fdopen = os.fdopen
    class Slow:
        def __init__(self, handle):
            self.handle = handle
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)
        def write(self, text):
            Path(writing).touch()
            time.sleep(2)
            return self.handle.write(text)
    os.fdopen = lambda *args, **kwargs: Slow(real_fdopen(*args, **kwargs))
try:
    rundir.RunLock(run).acquire()
    print("held", flush=True)
    time.sleep(5)  # longer than the slow write: alive when the slow one looks
except ConfigError as err:
    print(err)
"""


def test_a_lock_being_written_is_never_taken_for_a_crashed_one(tmp_path):
    """The lock is written aside and linked into place whole: a second writer that starts while the first is still
    writing it finds no lock or a whole one, never an empty one that it would take for a crashed holder's (and so
    hold the run too)."""
    run, writing = tmp_path / "run", tmp_path / "writing"
    slow = subprocess.Popen([PYTHON, "-c", CONTENDER, str(run), str(writing)], env=script_env(),
                            stdout=subprocess.PIPE, text=True)
    second = subprocess.Popen([PYTHON, "-c", CONTENDER, str(run), "-", str(writing)], env=script_env(),
                              stdout=subprocess.PIPE, text=True)
    answers = [process.communicate(timeout=120)[0].strip() for process in (slow, second)]
    assert answers[1] == "held" and f"is in use by pid {second.pid} " in answers[0], answers


def test_without_hard_links_the_lock_is_created_in_place(tmp_path, monkeypatch):
    def no_links(source, target):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    lock = rundir.RunLock(tmp_path)
    lock.acquire()
    assert json.loads((tmp_path / rundir.LOCK_NAME).read_text())["pid"] == os.getpid()
    with pytest.raises(ConfigError, match="in use by pid"):
        lock_holder(tmp_path / "other", pid=1, slurm_job_id=None, host="another-node")
        rundir.RunLock(tmp_path / "other").acquire()
    assert sorted(path.name for path in tmp_path.iterdir()) == [rundir.LOCK_NAME, "other"]  # no copy left beside it
    lock.release()
    assert not (tmp_path / rundir.LOCK_NAME).exists()


@pytest.mark.parametrize("text", ["[]\n", '{"host": "%s", "pid": "x"}\n' % socket.gethostname(), "{}\n"],
                         ids=["not-an-object", "pid-not-a-number", "no-pid"])
def test_a_lock_this_code_did_not_write_is_taken_over(tmp_path, text):
    (tmp_path / rundir.LOCK_NAME).write_text(text)
    rundir.RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / rundir.LOCK_NAME).read_text())["pid"] == os.getpid()


def test_an_output_dir_below_a_file_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("")
    result = run_script("main_pretrain.py", *TINY, "--output_dir", tmp_path / "afile" / "run")
    assert_user_error(result, "main_pretrain.py", "cannot write", str(tmp_path / "afile" / "run"), "Not a directory",
                      "a folder on that path is a file")


def test_a_checkpoint_that_is_a_directory_is_refused_as_such(tmp_path):
    (tmp_path / "run" / "checkpoint.pth").mkdir(parents=True)
    result = run_script("main_pretrain.py", *TINY, "--output_dir", tmp_path / "run")
    assert_user_error(result, "main_pretrain.py", f"{str(tmp_path / 'run' / 'checkpoint.pth')!r} is a directory")


def test_metrics_lines_of_side_by_side_writers_never_interleave(tmp_path):
    path = tmp_path / "metrics.jsonl"
    big = "x" * 20000  # longer than a pipe buffer: one write, under the lock

    def write(tag):
        for i in range(50):
            rundir.append_jsonl(path, {"writer": tag, "i": i, "payload": big})

    threads = [threading.Thread(target=write, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 200 and all(r["payload"] == big for r in records)
    for tag in range(4):
        assert [r["i"] for r in records if r["writer"] == tag] == list(range(50))


def test_a_record_appended_while_lines_are_moved_out_is_kept(tmp_path):
    """move_jsonl_lines replaces metrics.jsonl under the writers' lock: an evaluation appending meanwhile waits, then
    writes to the new file (on the old one, which the rename unlinks, its record was lost)."""
    path, aside = tmp_path / "metrics.jsonl", tmp_path / "metrics.rewound.jsonl"
    for epoch in (1, 2, 3):
        rundir.append_jsonl(path, {"epoch": epoch})
    deciding, appended = threading.Event(), threading.Event()

    def should_move(record):
        deciding.set()
        appended.wait(0.5)  # the append below is blocked on the lock: it cannot finish before the move
        return record["epoch"] > 1

    writer = threading.Thread(target=lambda: (deciding.wait(), rundir.append_jsonl(path, {"epoch": 4}),
                                              appended.set()))
    writer.start()
    assert rundir.move_jsonl_lines(path, aside, should_move) == 2
    writer.join()
    assert [r["epoch"] for r in rundir.read_jsonl(path)] == [1, 4]
    assert [r["epoch"] for r in rundir.read_jsonl(aside)] == [2, 3]


def test_an_append_after_a_line_cut_short_loses_only_that_line(tmp_path):
    """The record after a line a crash cut short was glued onto it, and lost with it."""
    path = tmp_path / "metrics.jsonl"
    rundir.append_jsonl(path, {"a": 1})
    rundir.append_jsonl(path, {"b": 2})
    path.write_bytes(path.read_bytes()[:-4])
    rundir.append_jsonl(path, {"c": 3})
    assert rundir.read_jsonl(path) == [{"a": 1}, {"c": 3}]


def test_a_line_the_disk_takes_only_part_of_is_undone_and_names_the_file(tmp_path, monkeypatch):
    """A nearly full disk: Linux writes part of the line and returns the short count, without an error; the next
    write fails with ENOSPC. The record was lost half-written while the evaluation reported success."""
    path = tmp_path / "metrics.jsonl"
    rundir.append_jsonl(path, {"a": 1})
    before = path.read_bytes()
    write, line = os.write, b'{"b": 2}\n'

    def nearly_full(fd, data):  # takes the line's first half, then has no space left
        if data == line:
            return write(fd, data[:4])
        if data == line[4:]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(fd, data)

    monkeypatch.setattr(rundir.os, "write", nearly_full)
    with pytest.raises(OSError) as raised:
        rundir.append_jsonl(path, {"b": 2})
    monkeypatch.undo()
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(path)
    assert path.read_bytes() == before


# ---- refused before anything is rewritten ----------------------------------------------------------------------------

def _start_in_own_directory(rank, world, nodes):
    """Every rank trains in `run`, a path where each node sees a folder of its own (not a shared file system): rank r
    starts in nodes[r]."""
    os.environ["CLUSTERLAB_SHARED_WAIT_S"] = "3"  # two looks, 2 s apart, instead of a minute's
    os.chdir(nodes[rank])
    try:
        entry_module("main_pretrain").main([*TINY, "--output_dir", "run"])
        return "trained"
    except ConfigError as err:
        return str(err)


@pytest.mark.parametrize("resumed", [False, True])
def test_a_run_directory_the_ranks_do_not_share_is_refused_on_every_rank(tiny_run, tmp_path, resumed):
    """Only rank 0 writes the run directory and every rank reads the checkpoint it resumes from: on a folder local
    to each node a resumed run's ranks started from different steps. Refused at the first start (rank 0's
    status.json is not there for rank 1) and at a resume (nor its checkpoint)."""
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        node.mkdir()
    if resumed:
        copy_run(tiny_run, nodes[0] / "run")
    said = run_distributed(_start_in_own_directory, 2, [str(node) for node in nodes])
    name = "checkpoint.pth" if resumed else "status.json"
    for message in said:
        assert message.startswith(f"--output_dir run: rank(s) 0 find {name} there and rank(s) 1 do not")
        assert message.endswith("the run directory must be on a file system every node shares")


def test_fewer_epochs_than_the_checkpoint_is_refused_and_rewrites_nothing(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    before = snapshot(run)
    result = run_script("main_pretrain.py", *TINY, "--epochs", 1, "--output_dir", run)
    assert_user_error(result, "main_pretrain.py", "--epochs 1: ", "checkpoint.pth is already at the end of epoch 2",
                      "(use --epochs 2 or more")
    assert snapshot(run) == before


def test_fewer_epochs_than_a_mid_epoch_checkpoint_is_refused_with_advice_that_works(tiny_run, tmp_path):
    """A stop signal's checkpoint 5 steps into the third epoch needs --epochs 3 (it advised 2, the refused value)."""
    run = copy_run(tiny_run, tmp_path / "run")
    state = checkpoint.load(run / "checkpoint.pth")
    tags = {key: state.pop(key) for key in ("format", "schema", "kind", "method")}
    state.update(step=5, global_step=state["global_step"] + 5)
    checkpoint.save(state, run / "checkpoint.pth", kind=tags["kind"], method=tags["method"])
    result = run_script("main_pretrain.py", *TINY, "--epochs", 2, "--output_dir", run)
    assert_user_error(result, "main_pretrain.py", "--epochs 2: ", "checkpoint.pth is already at epoch 3 step 5/14",
                      "(use --epochs 3 or more")


def test_fewer_epochs_than_an_epoch_end_of_a_longer_schedule_is_refused_with_advice_that_works(tiny_run, tmp_path):
    """At the end of epoch 2 of a 4-epoch schedule, --epochs 1 advised --epochs 2 or more; --epochs 2 is then
    refused too (no step would train under it): 3 or more."""
    run = copy_run(tiny_run, tmp_path / "run")
    state = checkpoint.load(run / "checkpoint.pth")
    tags = {key: state.pop(key) for key in ("format", "schema", "kind", "method")}
    state["args"]["epochs"] = 4
    checkpoint.save(state, run / "checkpoint.pth", kind=tags["kind"], method=tags["method"])
    result = run_script("main_pretrain.py", *TINY, "--epochs", 1, "--output_dir", run)
    assert_user_error(result, "main_pretrain.py", "--epochs 1: ", "checkpoint.pth is already at the end of epoch 2",
                      "(use --epochs 3 or more")
    result = run_script("main_pretrain.py", *TINY, "--epochs", 2, "--output_dir", run)
    assert_user_error(result, "main_pretrain.py", "--epochs 2: ", "stands at the end of epoch 2 of the 4 its "
                      "schedule plans")


def test_a_queue_that_does_not_fit_the_batch_is_refused_at_start(tmp_path):
    run = tmp_path / "run"
    result = run_script("main_pretrain.py", *TINY, "--queue_length", 100, "--epoch_queue_starts", 1,
                        "--output_dir", run)
    assert_user_error(result, "main_pretrain.py", "--queue_length 100", "multiple of the global batch 64")
    assert not run.exists()


# ---- SIGKILL at any moment -------------------------------------------------------------------------------------------

def killed_at(run, pattern: str, *extra) -> None:
    """Start the run and SIGKILL it once its stdout shows `pattern`."""
    process = subprocess.Popen([PYTHON, str(ROOT / "main_pretrain.py"), *map(str, TINY), "--log_every", "1",
                                *map(str, extra), "--output_dir", str(run)], cwd=ROOT, env=script_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in process.stdout:
        if pattern in line:
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=60)


def test_killed_mid_epoch_then_resumed_keeps_a_clean_log_and_no_leftovers(tiny_run, tmp_path):
    run = tmp_path / "run"
    killed_at(run, "epoch 2/2 step 5/", "--checkpoint_epochs", 1, 2)
    (run / ".checkpoint.pth.abc.tmp").write_bytes(b"half a checkpoint")  # as a kill during a write leaves
    assert_ok(run_script("main_pretrain.py", *TINY, "--log_every", 1, "--checkpoint_epochs", 1, 2,
                         "--output_dir", run))
    assert not list(run.glob(".*"))  # no temporary file, no lock
    steps = [(r["epoch"], r["step"]) for r in rundir.read_jsonl(run / "train_log.jsonl") if "step" in r]
    assert steps == [(e, s) for e in range(2) for s in range(898 // 64)]  # each step once, as uninterrupted
    assert {p.name for p in run.glob("checkpoint*.pth")} == {"checkpoint.pth", "checkpoint_ep0001.pth",
                                                            "checkpoint_ep0002.pth"}


def test_an_epoch_checkpoint_lost_between_the_two_writes_is_restored(tiny_run, tmp_path):
    # A run killed after checkpoint.pth reached epoch 1 but before checkpoint_ep0001.pth was written.
    run = copy_run(tiny_run, tmp_path / "run")
    state = checkpoint.load(run / "checkpoint_ep0001.pth")
    checkpoint.save({k: v for k, v in state.items() if k not in ("format", "schema", "kind", "method")},
                    run / "checkpoint.pth", kind="pretrain", method="swav")
    (run / "checkpoint_ep0001.pth").unlink()
    (run / "checkpoint_ep0002.pth").unlink()
    assert_ok(run_script("main_pretrain.py", *TINY, "--checkpoint_epochs", 1, 2, "--output_dir", run))
    assert checkpoint.load(run / "checkpoint_ep0001.pth")["epoch"] == 1
    assert checkpoint.load(run / "checkpoint_ep0002.pth")["epoch"] == 2


def test_files_follow_the_umask(tmp_path):
    run = tmp_path / "run"
    env = {**script_env()}
    result = subprocess.run(["bash", "-c", f"umask 027 && exec {PYTHON} main_pretrain.py "
                             + " ".join(map(str, TINY)) + f" --epochs 1 --output_dir {run}"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert_ok(result)
    modes = {p.name: p.stat().st_mode & 0o777 for p in run.iterdir()}
    assert set(modes.values()) == {0o640}, modes


# ---- full disks and read-only mounts (a real tmpfs in a private mount namespace) --------------------------------------

def can_mount() -> bool:
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    return probe.returncode == 0


needs_mount = pytest.mark.skipif(not can_mount(), reason="needs `unshare -m` (root) to mount a small tmpfs")


def in_small_filesystem(tmp_path, options: str, *args, fill: bool = False) -> tuple[subprocess.CompletedProcess, dict]:
    """Run main_pretrain.py with --output_dir on a fresh tmpfs mounted with `options`; returns the result and
    {name: bytes} of what the run directory held when the process ended (the mount ends with the namespace)."""
    mount, kept = tmp_path / "mnt", tmp_path / "kept"
    mount.mkdir()
    kept.mkdir()
    argv = " ".join([PYTHON, "main_pretrain.py", *map(str, TINY), *map(str, args), "--output_dir", f"{mount}/run"])
    fill_step = f"mkdir {mount}/run && (dd if=/dev/zero of={mount}/run/filler bs=4k 2>/dev/null || true) && " \
        if fill else ""
    script = (f"mount -t tmpfs -o {options} tmpfs {mount} && {fill_step}"
              f"{{ {argv}; rc=$?; cp -a {mount}/. {kept}/ 2>/dev/null; exit $rc; }}")
    result = subprocess.run(["unshare", "-m", "bash", "-c", script], cwd=ROOT, env=script_env(), capture_output=True,
                            text=True, timeout=180)
    files = {p.name: p.read_bytes() for p in (kept / "run").iterdir()} if (kept / "run").is_dir() else {}
    return result, files


@needs_mount
def test_disk_full_during_a_checkpoint_write_is_one_line_and_recorded(tmp_path):
    result, files = in_small_filesystem(tmp_path, "size=256k")  # the first checkpoint (~450 kB) does not fit
    assert_user_error(result, "main_pretrain.py", "cannot write", "checkpoint.pth", "No space left on device",
                      "free some space")
    status = json.loads(files["status.json"])
    assert status["state"] == "failed" and "No space left on device" in status["reason"], status
    assert (status["epoch"], status["step"]) == (1, 0)
    assert not any(name.startswith(".") for name in files), sorted(files)  # no temporary file, no lock


@needs_mount
def test_disk_full_at_start_is_one_line(tmp_path):
    result, files = in_small_filesystem(tmp_path, "size=64k", fill=True)
    assert_user_error(result, "main_pretrain.py", "cannot write", "No space left on device")
    assert set(files) == {"filler"}


@needs_mount
def test_read_only_output_dir_is_one_line(tmp_path):
    result, files = in_small_filesystem(tmp_path, "ro,size=64k")
    assert_user_error(result, "main_pretrain.py", "cannot write", f"{tmp_path / 'mnt' / 'run'}",
                      "Read-only file system", "writable --output_dir")
    assert files == {}


# An evaluation program run in-process, telling on stdout when it starts computing features (or pixels).
EVALUATION_WATCHED = """
import sys
from clusterlab.eval import features
from clusterlab.programs import run
computing = features.extract
def told(*args, **kwargs):
    print("computing features", flush=True)
    return computing(*args, **kwargs)
features.extract = told
sys.argv = sys.argv[1:]
run(sys.argv[0], sys.argv[1:])
"""


def in_read_only_run(run: Path, program: str, *flags) -> subprocess.CompletedProcess:
    """`program` with `flags` (RUN for `run`), `run` mounted read-only in a private mount namespace."""
    argv = " ".join([PYTHON, "-c", shlex.quote(EVALUATION_WATCHED), program,
                     *(shlex.quote(str(flag).replace("RUN", str(run))) for flag in flags)])
    script = f"mount --bind {run} {run} && mount -o remount,ro,bind {run} && {argv}"
    return subprocess.run(["unshare", "-m", "bash", "-c", script], cwd=ROOT, env=script_env(), capture_output=True,
                          text=True, timeout=180)


@needs_mount
@pytest.mark.parametrize("program, flags", [
    ("eval_knn.py", ["--run", "RUN", "--k", "5"]),
    ("eval_cluster.py", ["--run", "RUN", "--restarts", "1"]),
    ("eval_linear.py", ["--run", "RUN", "--epochs", "1", "--cached_features", "true"]),
    ("eval_knn.py", ["--baseline", "pixels", "--dataset", "digits", "--output_dir", "RUN/pixels"]),  # not made yet
])
def test_an_evaluation_of_a_read_only_run_stops_before_its_work(tiny_run, tmp_path, program, flags):
    """The record's write, at the end, met the read-only run directory: the features (an hour of them on a large
    set) were computed for nothing."""
    run = copy_run(tiny_run, tmp_path / "run")
    result = in_read_only_run(run, program, *flags, "--device", "cpu")
    assert_user_error(result, program, f"cannot write {str(run)!r}: Read-only file system")
    assert "computing features" not in result.stdout


@pytest.mark.parametrize("program, flags", [
    ("eval_knn.py", ["--k", "5"]),
    ("eval_cluster.py", ["--restarts", "1"]),
])
def test_a_record_file_linked_into_a_missing_folder_stops_an_evaluation_before_its_work(tiny_run, tmp_path, program,
                                                                                       flags):
    """The record's write, after the features, met the link (a traceback, the work lost)."""
    run = copy_run(tiny_run, tmp_path / "run")
    (run / "metrics.jsonl").unlink(missing_ok=True)
    (run / "metrics.jsonl").symlink_to(tmp_path / "gone" / "metrics.jsonl")
    result = run_script(program, "--run", run, *flags, "--device", "cpu")
    assert_user_error(result, program, f"{run / 'metrics.jsonl'} links to {str(tmp_path / 'gone' / 'metrics.jsonl')!r}"
                                       f", in a folder that does not exist")
    assert "computing features" not in result.stdout


@needs_mount
def test_a_recorded_evaluation_of_a_read_only_run_is_skipped(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    knn = ["--run", "RUN", "--k", "5", "--device", "cpu", "--skip_recorded", "true"]
    assert_ok(run_script("eval_knn.py", *[str(flag).replace("RUN", str(run)) for flag in knn]))
    skipped = in_read_only_run(run, "eval_knn.py", *knn)
    assert_ok(skipped)
    assert "already recorded" in skipped.stdout and "computing features" not in skipped.stdout

def test_a_run_trained_before_a_flag_existed_can_still_be_evaluated(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    del recorded["args"]["init"], recorded["args"]["no_decay_bias_norm"]
    (run / "config.yaml").write_text(yaml.safe_dump(recorded))
    state = checkpoint.load(run / "checkpoint.pth")
    del state["args"]["init"], state["args"]["no_decay_bias_norm"]
    checkpoint.save({k: v for k, v in state.items() if k not in ("format", "schema", "kind", "method")},
                    run / "checkpoint.pth", kind="pretrain", method="swav")
    assert_ok(run_script("eval_knn.py", "--run", run, "--device", "cpu"))


def test_a_lock_that_cannot_be_removed_does_not_replace_the_error_that_ended_the_run(tmp_path, monkeypatch):
    """The output directory turned read-only mid-run: the one-line error named .lock, whose removal failed while the
    run left, instead of train_log.jsonl, whose write had ended it. The lock stays, to be taken over as stale."""
    lock = rundir.RunLock(tmp_path)
    lock.acquire()

    def read_only(path, missing_ok=False):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(Path, "unlink", read_only)
    lock.release()
    assert not lock.held and lock.path.exists()


def test_a_fresh_training_in_a_directory_holding_evaluations_of_earlier_weights_is_refused(tiny_run, tmp_path):
    """Checkpoints removed to train the run again in place: the old weights' metrics records and linear probes name
    the same checkpoint files at the same epochs. --skip_recorded then skipped the new weights' evaluations (the
    tables showed the old numbers under the new flags) and eval_linear.py resumed the old probe's head on the new
    backbone. Refused on one line before anything is written."""
    run = copy_run(tiny_run, tmp_path / "run")
    foreign = '{"eval": "knn", "checkpoint": "/elsewhere/checkpoint.pth", "epoch": 2}\n'
    (run / "metrics.jsonl").write_text(foreign + '{"eval": "knn", "checkpoint": "checkpoint.pth", "epoch": 2}\n')
    (run / "linear_ep0002").mkdir()
    for path in run.glob("checkpoint*.pth"):
        path.unlink()
    before = sorted(p.name for p in run.iterdir())
    result = run_script("main_pretrain.py", *TINY, "--lr", "0.5", "--output_dir", run)
    assert_user_error(result, "main_pretrain.py", "holds evaluations of earlier weights", "metrics.jsonl",
                      "linear_ep0002")
    assert sorted(p.name for p in run.iterdir()) == before
    # evaluations of another directory's checkpoint (named by its full path, a probe by its `_from` tag) are no
    # evaluations of this run's weights
    (run / "metrics.jsonl").write_text(foreign)
    (run / "linear_ep0002").rename(run / "linear_ep0002_from0123abcd")
    assert_ok(run_script("main_pretrain.py", *TINY, "--epochs", "1", "--output_dir", run))


def test_a_rewound_run_sets_aside_the_evaluations_of_the_weights_it_replaced(tiny_run, tmp_path):
    """The NaN guard's advice: copy an earlier checkpoint_epNNNN.pth over checkpoint.pth and train on (other flags).
    The retrained weights reach the same epochs as the discarded ones, whose records and probes named the same
    checkpoints at the same positions: --skip_recorded skipped the new weights, eval_linear resumed the old probe on
    them, the tables showed the old numbers. Those evaluations move aside; the earlier epoch's stay."""
    run = copy_run(tiny_run, tmp_path / "run")
    assert_ok(run_script("eval_knn.py", "--run", run, "--k", "20", "--device", "cpu"))
    assert_ok(run_script("eval_knn.py", "--run", run, "--checkpoint", "checkpoint_ep0001.pth", "--k", "20",
                         "--device", "cpu"))
    foreign = {"eval": "knn", "checkpoint": "/elsewhere/checkpoint.pth", "epoch": 2, "metrics": {}}
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps(foreign) + "\n")
    for probe in ("linear_ep0002_cached", "linear_ep0001_cached", "linear_ep0002_from0123abcd"):
        (run / probe).mkdir()
    before = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    shutil.copy(run / "checkpoint_ep0001.pth", run / "checkpoint.pth")
    result = run_script("main_pretrain.py", *TINY, *TINY_RUN, "--lr", "0.5", "--output_dir", run)
    assert_ok(result)
    assert "is older than evaluations of this run (it was rewound)" in result.stdout
    assert "moved 1 record(s) of metrics.jsonl to metrics.rewound.jsonl, linear_ep0002_cached/ to " \
           "rewound_linear_ep0002_cached/" in result.stdout
    kept = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert kept == [record for record in before if record["epoch"] == 1 or record is before[-1]]
    assert [r["epoch"] for r in rundir.read_jsonl(run / "metrics.rewound.jsonl")] == [2]
    assert sorted(p.name for p in run.glob("*linear_ep*")) == ["linear_ep0001_cached", "linear_ep0002_from0123abcd",
                                                                 "rewound_linear_ep0002_cached"]
    again = run_script("eval_knn.py", "--run", run, "--k", "20", "--skip_recorded", "true", "--device", "cpu")
    assert_ok(again)
    assert "skipped" not in again.stdout and "top1" in again.stdout


def _files(run: Path) -> dict:
    return {path.name: (path.read_bytes() if path.is_file() else None) for path in run.iterdir()}


@pytest.mark.parametrize("lost", ["removed", "dangling link"])
def test_a_trained_run_that_lost_its_checkpoint_is_not_trained_afresh_over_its_files(tiny_run, tmp_path,
                                                                                      run_in_process, lost):
    """checkpoint.pth removed by hand, or a link to it on a scratch area that was purged: the next start trained
    from scratch, replacing checkpoint_ep0001.pth, the training log and status.json without a word."""
    run = copy_run(tiny_run, tmp_path / "run")
    (run / "checkpoint.pth").unlink()
    if lost == "dangling link":
        (run / "checkpoint.pth").symlink_to(tmp_path / "purged" / "checkpoint.pth")
    before = _files(run)
    result = run_in_process("main_pretrain.py", *TINY, "--epochs", 3, "--output_dir", run)
    words = (["links to", "which does not exist", "trained to the end of epoch 2"] if lost == "dangling link" else
             ["has no checkpoint.pth but holds checkpoint_ep0002.pth",
              "copy checkpoint_ep0002.pth over checkpoint.pth"])
    assert_user_error(result, "main_pretrain.py", *words)
    assert _files(run) == before


def test_a_checkpoint_linked_to_a_scratch_area_stays_a_link(tiny_run, tmp_path):
    """The run's checkpoint.pth linked to a file elsewhere: a resume writes that file (it replaced the link with a
    file of its own, leaving the scratch copy behind); a link made before the first start is written through."""
    run, scratch = copy_run(tiny_run, tmp_path / "run"), tmp_path / "scratch"
    scratch.mkdir()
    (run / "checkpoint.pth").rename(scratch / "checkpoint.pth")
    (run / "checkpoint.pth").symlink_to(scratch / "checkpoint.pth")
    assert_ok(run_script("main_pretrain.py", *TINY, "--epochs", 3, "--output_dir", run))
    assert (run / "checkpoint.pth").is_symlink() and checkpoint.load(scratch / "checkpoint.pth")["epoch"] == 3
    assert not list(scratch.glob(".*.tmp"))
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "checkpoint.pth").symlink_to(scratch / "fresh.pth")
    # stopped before its first step (nothing saved: status.json "interrupted" at the start), then started again,
    # with a temporary file that a save killed through the link left beside the link's file
    rundir.write_status(fresh, "interrupted", epoch=0, step=0, epochs=1, signal="SIGUSR2")
    (scratch / ".fresh.pth.k1ll3d00.tmp").write_bytes(b"half a checkpoint")
    assert_ok(run_script("main_pretrain.py", *TINY, "--epochs", 1, "--output_dir", fresh))
    assert (fresh / "checkpoint.pth").is_symlink() and checkpoint.load(scratch / "fresh.pth")["epoch"] == 1
    assert not list(scratch.glob(".*.tmp"))


def test_a_resume_refuses_weights_damaged_into_nan(tiny_run, tmp_path, run_in_process):
    """Training never saves non-finite weights: a checkpoint.pth holding one was damaged since, and the resume ran
    into a 'loss is not finite' at its first step, pointing at the same file again."""
    import torch

    run = copy_run(tiny_run, tmp_path / "run")
    state = torch.load(run / "checkpoint.pth", weights_only=True)
    name = next(key for key, value in state["model"].items() if value.is_floating_point())
    state["model"][name].view(-1)[0] = float("nan")
    torch.save(state, run / "checkpoint.pth")
    before = _files(run)
    result = run_in_process("main_pretrain.py", *TINY, "--epochs", 3, "--output_dir", run)
    assert_user_error(result, "main_pretrain.py", "holds non-finite weights", name)
    assert _files(run) == before


def test_temporary_files_of_a_sibling_of_a_linked_checkpoint_are_left_alone(tmp_path):
    """Only the temporary files of the linked file itself (mkstemp's `.NAME.XXXXXXXX.tmp`) are leftovers: a sibling
    `checkpoint.pth.2` of another run may be in the middle of its own save."""
    scratch, run = tmp_path / "scratch", tmp_path / "run"
    scratch.mkdir()
    run.mkdir()
    (run / "checkpoint.pth").symlink_to(scratch / "checkpoint.pth")
    mine, sibling = scratch / ".checkpoint.pth.abcd1234.tmp", scratch / ".checkpoint.pth.2.abcd1234.tmp"
    for path in (mine, sibling):
        path.write_bytes(b"partial")
    rundir.remove_leftovers(run)
    assert not mine.exists() and sibling.exists()


@pytest.mark.parametrize("content", ["[1, 2]\n", "\"finished\"\n", "{\"state\": \"fin", ""])
def test_a_status_that_is_not_a_json_object_reads_as_none(tmp_path, content):
    """A hand-edited status.json holding a list: launch.py's plan asked it for fields, an AttributeError's traceback."""
    (tmp_path / "status.json").write_text(content)
    assert rundir.read_status(tmp_path) == {}
    (tmp_path / "status.json").write_text('{"state": "finished", "epoch": 2}\n')
    assert rundir.read_status(tmp_path) == {"state": "finished", "epoch": 2}
