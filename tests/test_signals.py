"""The stop-signal handler (signals.py) in a process of its own: what reaches the handler that was there before ours."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import time

import pytest
import torch
import yaml

from conftest import PYTHON, ROOT, TINY, script_env
from dist_utils import free_port, run_distributed

# A previous handler (submitit's requeues the job) during which a second stop signal arrives, as under Slurm a task
# gets TERM from slurmstepd and again from the batch shell's trap.
SECOND_SIGNAL_WHILE_LEAVING = """
import os, signal
calls = []
def previous(signum, frame):
    calls.append(signum)
    print(f"previous handler call {len(calls)}", flush=True)
    if len(calls) == 1:
        os.kill(os.getpid(), signal.SIGTERM)
signal.signal(signal.SIGUSR2, previous)
signal.signal(signal.SIGTERM, previous)
from clusterlab import signals
signals.install()
os.kill(os.getpid(), signal.SIGUSR2)
print("not reached")
"""


def test_a_second_signal_while_leaving_does_not_run_the_previous_handler_again():
    done = subprocess.run([PYTHON, "-c", SECOND_SIGNAL_WHILE_LEAVING], cwd=ROOT, env=script_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 75, done.stderr
    assert done.stdout.splitlines() == ["previous handler call 1"]


# SIGTERM first, SIGUSR2 after, both while a training step runs: some clusters pre-empt that way, and only
# USR2's handler (submitit's) requeues. The first signal's handler alone ran (submitit's TERM handler only logs).
TERM_THEN_USR2 = """
import os, signal
def previous(signum, frame):
    print("previous handler of", signal.Signals(signum).name, flush=True)
signal.signal(signal.SIGUSR2, previous)
signal.signal(signal.SIGTERM, previous)
from clusterlab import signals
signals.install()
signals.defer()
os.kill(os.getpid(), signal.SIGTERM)
os.kill(os.getpid(), signal.SIGUSR2)
print("first received:", signal.Signals(signals.received()).name, flush=True)
signals.defer(False)
"""


def test_a_usr2_after_a_term_still_reaches_the_handler_that_requeues():
    done = subprocess.run([PYTHON, "-c", TERM_THEN_USR2], cwd=ROOT, env=script_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 75, done.stderr
    assert done.stdout.splitlines() == ["first received: SIGTERM", "previous handler of SIGUSR2"]


def test_a_usr1_asks_for_the_requeue_as_usr2_does():
    """SIGUSR1, the signal other tools ask Slurm for (`--signal=USR1@90`), killed the process at once (Python's
    default action): no checkpoint, and status.json left `running`. It is a stop signal, handed over as USR2."""
    script = TERM_THEN_USR2.replace("os.kill(os.getpid(), signal.SIGTERM)\nos.kill(os.getpid(), signal.SIGUSR2)",
                                    "os.kill(os.getpid(), signal.SIGUSR1)")
    assert script != TERM_THEN_USR2
    done = subprocess.run([PYTHON, "-c", script], cwd=ROOT, env=script_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 75, done.stderr
    assert done.stdout.splitlines() == ["first received: SIGUSR1", "previous handler of SIGUSR2"]


# Rank 0 stops because another rank was signalled (the ranks agree on a stop): it received nothing itself, and
# submitit's handler exits with -1 after requeueing. status.json said "failed" although the run was saved.
def script_in_a_run(state: str, inside: str, before: str = "", outcome: str = "") -> str:
    """A script that holds a run directory (its status.json `state`, its trainer at epoch 1 step 3), runs `inside`
    in that block (`before` at its start, `outcome` the handlers of the try around the block), then prints the state
    status.json ends in."""
    return f"""
import json, os, signal, sys, types
{before}
from clusterlab import distributed, engine, rundir, signals
signals.install()
run_dir = sys.argv[1]
try:
    with engine.owned_run_dir(run_dir, distributed.init("cpu")) as owned:
        rundir.write_status(run_dir, "{state}", epoch=0, step=3)
        trainer = types.SimpleNamespace(finished=False, position=(0, 3), args=types.SimpleNamespace(epochs=2),
                                        run_dir=owned.run_dir)
        trainer.mark_interrupted = lambda: engine.Trainer.mark_interrupted(trainer)
        owned.trainer = trainer
{textwrap.indent(inside, " " * 8)}
{outcome}
finally:
    print(json.loads(open(run_dir + "/status.json").read())["state"], flush=True)
"""


# Rank 0 stops because another rank was signalled (the ranks agree on a stop): it received nothing itself, and
# submitit's handler exits with -1 after requeueing. status.json said "failed" although the run was saved.
STOPPED_FOR_ANOTHER_RANK = script_in_a_run("interrupted", "signals.leave()", before="""
def submitit_like(signum, frame):
    print("requeued on", signal.Signals(signum).name, flush=True)
    sys.exit(-1)
signal.signal(signal.SIGUSR2, submitit_like)""")


def test_a_rank_stopped_for_another_ranks_signal_leaves_the_run_interrupted(tmp_path):
    done = subprocess.run([PYTHON, "-c", STOPPED_FOR_ANOTHER_RANK, str(tmp_path / "run")], cwd=ROOT, env=script_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 255, done.stderr
    assert done.stdout.splitlines() == ["requeued on SIGUSR2", "interrupted"]


def signal_on_import(module: str) -> str:
    """Python lines that send this process SIGUSR2 when `module` starts to be imported (its handler runs there)."""
    return f"""
import os, signal, sys
class SignalOnImport:
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            os.kill(os.getpid(), signal.SIGUSR2)
        return None
sys.meta_path.insert(0, SignalOnImport())
"""


# A program run as its script runs it (programs.run), then what the stop signals do while the interpreter shuts down:
# atexit runs before Python gives them their default action back, which a second SIGTERM then took (status 143).
# "starting": a stop signal while programs.run sets up (its import of clusterlab.errors): exit 75.
DISPOSITION_AT_EXIT = """
import atexit, os, signal, sys
atexit.register(lambda: print("ignored at exit:", all(signal.getsignal(s) is signal.SIG_IGN
                                                          for s in (signal.SIGTERM, signal.SIGUSR2)), flush=True))
if sys.argv[1] == "starting":
    exec(sys.argv.pop(2))
from clusterlab import programs
if sys.argv[1] == "signalled":  # a stop signal at the first step: saved, exit 75
    from clusterlab import engine
    step = engine.Trainer.step
    def signalled(self, *args):
        os.kill(os.getpid(), signal.SIGUSR2)
        return step(self, *args)
    engine.Trainer.step = signalled
programs.run("main_pretrain.py", sys.argv[2:])
"""


@pytest.mark.parametrize("case, status", [("finished", 0), ("signalled", 75), ("starting", 75)])
def test_a_program_that_ended_or_left_for_the_requeue_ignores_further_stop_signals(tmp_path, case, status):
    """A second stop signal (Slurm's TERM after USR2) while the process ends must not kill it: status 143 where it
    had left with 75, when the first came while programs.run still set up."""
    hook = [signal_on_import("clusterlab.errors")] if case == "starting" else []
    done = subprocess.run([PYTHON, "-c", DISPOSITION_AT_EXIT, case, *hook, *TINY, "--epochs", "1", "--output_dir",
                           str(tmp_path / "run")], cwd=ROOT, env=script_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == status, done.stderr
    assert done.stdout.splitlines()[-1] == "ignored at exit: True"


def test_a_signal_where_nothing_is_saved_says_so_and_exits_75():
    """A stop during a start or an evaluation: a job's log showed only srun's "exited with exit code 75"."""
    code = ("import os, signal, time\nfrom clusterlab import signals\nsignals.install()\n"
            "os.kill(os.getpid(), signal.SIGUSR2)\ntime.sleep(30)\n")
    done = subprocess.run([PYTHON, "-c", code], cwd=ROOT, env=script_env(), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 75
    assert done.stderr == ("SIGUSR2: stopped where no checkpoint is written (a start, or an evaluation, whose finished "
                           "records are kept); exit status 75: a requeued job or the same command again does the "
                           "rest\n")


# A stop signal whose handler runs inside a weakref callback (importlib's module locks have one: a Slurm job signalled
# while Python imported): Python reports what the callback raises and goes on, so the requeue's exit was printed as
# "Exception ignored in ..." with a traceback, and the program went on to train a step before it left.
EXIT_IN_A_WEAKREF_CALLBACK = """
import os, signal, weakref
from clusterlab import signals
signals.install()
class Module:
    pass
def callback(_):
    os.kill(os.getpid(), signal.SIGUSR2)
    sum(range(1000))  # (Python code, where the handler runs)
module = Module()
lock = weakref.ref(module, callback)
del module
print("went on as if no signal had come", flush=True)
"""


def test_a_stop_signal_inside_code_whose_exceptions_python_ignores_still_leaves_with_75():
    done = subprocess.run([PYTHON, "-c", EXIT_IN_A_WEAKREF_CALLBACK], cwd=ROOT, env=script_env(), capture_output=True,
                          text=True, timeout=60)
    assert (done.returncode, done.stdout) == (75, ""), (done.stdout, done.stderr)
    assert done.stderr.startswith("SIGUSR2: stopped where no checkpoint is written") and "Traceback" not in done.stderr


@pytest.mark.parametrize("signum, status, words", [
    (signal.SIGUSR2, 75, "SIGUSR2: stopped where no checkpoint is written"),
    (signal.SIGTERM, 75, "SIGTERM: stopped where no checkpoint is written"),
    (signal.SIGINT, 130, "main_pretrain.py: interrupted from the keyboard (Ctrl-C)"),
])
def test_a_stop_signal_while_a_rank_waits_for_the_others_to_join_ends_it(tmp_path, signum, status, words):
    """The rendezvous blocks in torch's C++ code until every rank has come: a rank waiting for one that never came
    (a wrong MASTER_ADDR, a node that did not start) ignored stop signals and Ctrl-C for the 30-minute timeout."""
    port = free_port()
    # (SIGINT as a terminal's: a background job of a non-interactive shell, as a test run under nohup, passes it on
    # ignored)
    alone = subprocess.Popen([PYTHON, str(ROOT / "main_pretrain.py"), *TINY, "--output_dir", str(tmp_path / "run")],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**script_env(), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2",
                                  "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert "joining gloo at 127.0.0.1" in alone.stdout.readline()
        time.sleep(1.0)  # into the rendezvous's wait
        alone.send_signal(signum)
        out, err = alone.communicate(timeout=30)
    finally:
        alone.kill()
    assert alone.returncode == status, err
    assert err.splitlines()[-1].startswith(words) and "Traceback" not in err, err


@pytest.mark.parametrize("script", ["main_pretrain.py", "main_cluster.py", "eval_knn.py", "eval_linear.py",
                                    "eval_cluster.py", "launch.py", "collect_results.py"])
def test_every_root_script_catches_the_stop_signals_before_it_imports_its_program(tmp_path, script):
    """The handlers were installed by programs.run, after the programs' package and its imports (about a tenth of a
    second; 0.3 s on a loaded node): a job pre-empted then died of the signal (status 140), not requeued (75)."""
    (tmp_path / "sitecustomize.py").write_text(signal_on_import("clusterlab.programs"))
    env = {**script_env(), "PYTHONPATH": f"{tmp_path}:{script_env().get('PYTHONPATH', '')}"}
    done = subprocess.run([PYTHON, str(ROOT / script), "--help"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 75, (done.returncode, done.stderr)
    assert done.stderr.startswith("SIGUSR2: stopped where no checkpoint is written"), done.stderr


# TERM and USR2 waiting together for their handlers (both sent during an import, where Python runs no handler until
# the import's C code returns; here held back by the signal mask while the program starts): USR2's handler left,
# ignoring both signals on its way, and TERM, still waiting, met SIG_IGN at the next check (programs.run's own, or
# in the import's code): "Signal 15 ignored due to race condition" with a traceback, and inside torch's C++ import
# the process aborted.
TWO_AT_ONCE = """
import os, signal
from clusterlab import programs, signals
from clusterlab.programs import train
def signalled(*args, **kwargs):
    signal.pthread_sigmask(signal.SIG_BLOCK, signals.STOP_SIGNALS)
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGUSR2)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signals.STOP_SIGNALS)
train.parse_args = signalled
programs.run("main_pretrain.py", [])
"""


def test_two_stop_signals_at_once_where_nothing_is_saved_leave_with_one_line():
    done = subprocess.run([PYTHON, "-c", TWO_AT_ONCE], cwd=ROOT, env=script_env(), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 75
    assert done.stderr.splitlines() == ["SIGUSR2: stopped where no checkpoint is written (a start, or an evaluation, "
                                        "whose finished records are kept); exit status 75: a requeued job or the same "
                                        "command again does the rest"]


def _stopped_by_rank_one(rank, world_size):
    from clusterlab import engine, signals

    signals._received = signal.SIGUSR2 if rank == 1 else None
    engine.share_stop_signal(torch.device("cpu"))
    return signals.name()


def test_every_rank_names_the_stop_signal_one_rank_received():
    """Rank 0 writes status.json: for a SIGUSR2 that reached rank 1 only, it recorded "signal": "signal"."""
    assert run_distributed(_stopped_by_rank_one, 2) == ["SIGUSR2", "SIGUSR2"]


def test_a_distributed_run_ends_without_the_interpreters_finalisation(tmp_path):
    """gloo's worker threads outlive destroy_process_group once DDP has held the group, and one that lets go of its
    last collective after the interpreter began finalising aborts the process (status -6 after a finished run, now
    and then on a loaded machine). A program that joined a group ends before finalisation (no atexit handler runs),
    with its output and files whole, stdout block-buffered; a single process finalises as before."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import atexit, os, pathlib\n"
        "atexit.register(lambda: pathlib.Path(os.environ['FLAGS'], 'finalised' + os.environ.get('RANK', '')).touch())\n")
    port = free_port()
    base = {**script_env(), "PYTHONPATH": f"{site}:{os.environ.get('PYTHONPATH', '')}", "FLAGS": str(tmp_path)}
    base.pop("PYTHONUNBUFFERED")

    def start(run_dir, **rank_env):
        return subprocess.Popen([PYTHON, str(ROOT / "main_pretrain.py"), *TINY, "--epochs", "1", "--output_dir",
                                 str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**base, **rank_env})

    ranks = [start(tmp_path / "two", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port)) for rank in range(2)]
    outputs = [process.communicate(timeout=180) for process in ranks]
    assert [p.returncode for p in ranks] == [0, 0], outputs
    assert outputs[0][0].splitlines()[-1].startswith("finished 1 epoch; checkpoint in")
    assert json.loads((tmp_path / "two" / "status.json").read_text())["state"] == "finished"
    assert yaml.safe_load((tmp_path / "two" / "config.yaml").read_text())["world_size"] == 2
    assert not list(tmp_path.glob("finalised*"))
    alone = start(tmp_path / "one")
    out, err = alone.communicate(timeout=180)
    assert alone.returncode == 0 and out.splitlines()[-1].startswith("finished 1 epoch;"), (out, err)
    assert [p.name for p in tmp_path.glob("finalised*")] == ["finalised"]
    assert yaml.safe_load((tmp_path / "one" / "config.yaml").read_text())["world_size"] == 1


# A program whose process joined a process group (as distributed.init records it), ending in each way it can.
ENDING_IN_A_GROUP = """
import atexit, pathlib, sys, time
from clusterlab import distributed, programs
atexit.register(lambda: print("finalised", file=sys.stderr, flush=True))
def main(argv):
    distributed._joined = True
    print("working", end="")
    if argv[0] == "crash":
        raise RuntimeError("boom")
    if argv[0] == "message":
        sys.exit("a message")
    if argv[0] == "reader-gone":
        while not pathlib.Path(argv[1]).exists():
            time.sleep(0.05)
programs.PROGRAMS["ending.py"] = programs.Program("ending.py", "__main__")
programs.run("ending.py", sys.argv[1:])
"""


@pytest.mark.parametrize("case, status, stderr", [("ok", 0, ""), ("crash", 1, "RuntimeError: boom"),
                                                  ("message", 1, "a message"), ("reader-gone", 0, "")])
def test_a_process_in_a_group_ends_without_finalising_however_it_ends(tmp_path, case, status, stderr):
    """A traceback ends with status 1 after it is printed, sys.exit("message") prints it and ends with 1, and a
    standard output whose reader is gone (a closed pipe) does not send the exit back through the finalisation."""
    env = {key: value for key, value in script_env().items() if key != "PYTHONUNBUFFERED"}
    flag = tmp_path / "reader_gone"
    process = subprocess.Popen([PYTHON, "-c", ENDING_IN_A_GROUP, case, str(flag)], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if case == "reader-gone":
        process.stdout.close()
        flag.touch()
        err = process.stderr.read()
        process.wait(timeout=60)
        out = ""
    else:
        out, err = process.communicate(timeout=60)
    assert process.returncode == status, (out, err)
    assert stderr in err and "finalised" not in err, err
    assert out == ("" if case == "reader-gone" else "working")


# Two ranks of one run, one of them still starting (stop signals end it at once: nothing to save yet) while the other
# waits for it in its first training step (stop signals deferred to the step's end). A stop signal to both: the one
# starting leaves for the requeue, and the other's collective fails. That failure was the run's: status.json
# "failed", exit status 1, and submitit's requeue handler never ran on rank 0, so the job was not requeued.
RANK_SLOW_TO_START = """
import os, pathlib, signal, sys, time
from clusterlab import engine, programs
rank, flags, slow_rank = int(os.environ["RANK"]), pathlib.Path(sys.argv[1]), int(sys.argv[2])
def submitit_like(signum, frame):
    print("requeue handler ran", flush=True)
signal.signal(signal.SIGTERM, submitit_like)
if rank == slow_rank:
    def slow_start(self, *args, **kwargs):
        (flags / f"ready{rank}").touch()
        time.sleep(100)
    engine.Trainer.train_one_epoch = slow_start
else:
    import torch.distributed as dist
    step, all_reduce = engine.Trainer.step, dist.all_reduce
    def entering(*args, **kwargs):
        (flags / f"collective{rank}").touch()
        return all_reduce(*args, **kwargs)
    def first_step(self, *args):
        (flags / f"ready{rank}").touch()
        dist.all_reduce = entering  # the step's first collective waits for the rank still starting
        return step(self, *args)
    engine.Trainer.step = first_step
programs.run("main_pretrain.py", sys.argv[3:])
"""


@pytest.mark.parametrize("slow_rank", [1, 0])
def test_a_stop_signal_while_one_rank_still_starts_requeues_every_rank(tmp_path, slow_rank):
    port = free_port()
    run_dir = tmp_path / "run"
    def environment(rank):
        return {**script_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}

    ranks = [subprocess.Popen([PYTHON, "-c", RANK_SLOW_TO_START, str(tmp_path), str(slow_rank), *TINY,
                               "--output_dir", str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=environment(rank))
             for rank in range(2)]
    try:
        deadline = time.time() + 120
        # both ready, and the waiting rank inside its first collective
        waited = [tmp_path / f"ready{rank}" for rank in range(2)] + [tmp_path / f"collective{1 - slow_rank}"]
        while not all(flag.exists() for flag in waited):
            assert time.time() < deadline and all(p.poll() is None for p in ranks), [p.communicate() for p in ranks]
            time.sleep(0.1)
        for process in ranks:
            process.send_signal(signal.SIGTERM)
        outputs = [process.communicate(timeout=120) for process in ranks]
    finally:
        for process in ranks:
            process.kill()
    assert [p.returncode for p in ranks] == [75, 75], outputs
    assert [out.splitlines() for out, _ in outputs][slow_rank][-1] == "requeue handler ran"
    assert "requeue handler ran" in outputs[1 - slow_rank][0]
    assert json.loads((run_dir / "status.json").read_text())["state"] == "interrupted"


# The same rule, past the start: once a step has been done by every rank, a stop is agreed at a step's end, and an
# error in a later step (out of memory, a rank that crashed) is the run's, even with a stop signal deferred. It was
# taken for a requeue at any step.
ERROR_AFTER_A_DEFERRED_SIGNAL = """
import json, pathlib, signal, sys, types, torch
from clusterlab import distributed, engine, signals
steps = int(sys.argv[2])
distributed.world_size = lambda: 2
distributed.rank0_says = lambda taken: taken
run = pathlib.Path(sys.argv[1])
ctx = distributed.Context(rank=0, world_size=2, device=torch.device("cpu"))
signals.install()
try:
    with engine.owned_run_dir(run, ctx) as started:
        run.joinpath("status.json").write_text(json.dumps({"state": "running"}))
        started.trainer = types.SimpleNamespace(steps_this_start=steps, finished=False, position=(5, steps),
                                                args=types.SimpleNamespace(epochs=100))
        started.trainer.mark_interrupted = lambda: run.joinpath("status.json").write_text('{"state": "interrupted"}')
        signals.defer()
        signal.raise_signal(signal.SIGUSR2)
        raise torch.OutOfMemoryError("CUDA out of memory")
except SystemExit as stop:
    print("exit", stop.code)
except torch.OutOfMemoryError:
    print("raised")
print(json.loads(run.joinpath("status.json").read_text())["state"])
"""


@pytest.mark.parametrize("steps, outcome", [(0, ["exit 75", "interrupted"]), (3, ["raised", "failed"])])
def test_an_error_after_the_first_step_with_a_stop_signal_deferred_is_the_runs(tmp_path, steps, outcome):
    done = subprocess.run([PYTHON, "-c", ERROR_AFTER_A_DEFERRED_SIGNAL, str(tmp_path / "run"), str(steps)], cwd=ROOT,
                          env=script_env(), capture_output=True, text=True, timeout=120)
    assert done.stdout.splitlines()[-2:] == outcome, done.stdout + done.stderr


def test_ctrl_c_ends_a_training_run_with_one_line_and_status_130(tmp_path):
    """Ctrl-C is no stop signal (no checkpoint at the next step): the run fails where it stands, as status.json
    records, and the user reads one line, not Python's traceback."""
    run_dir = tmp_path / "run"
    # (a background job of a non-interactive shell, as a test run under nohup, passes SIGINT on ignored)
    process = subprocess.Popen([PYTHON, str(ROOT / "main_pretrain.py"), *TINY, "--epochs", "1000", "--log_every", "1",
                                "--output_dir", str(run_dir)], cwd=ROOT, env=script_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not (run_dir / "train_log.jsonl").exists() and time.monotonic() < deadline:  # a training step is done
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, (out, err)
    assert err.splitlines() == ["main_pretrain.py: interrupted from the keyboard (Ctrl-C)"], err
    status = json.loads((run_dir / "status.json").read_text())
    assert (status["state"], status["reason"]) == ("failed", "interrupted from the keyboard")


# A stop signal while an extension module imports (scikit-learn's numpy code): the handler's SystemExit is raised
# inside that code, which let another error out instead (seen as numpy's "is not a valid PEP 3118 buffer format
# string" ValueError when Slurm requeued a job starting its k-means).
SWALLOWED_EXIT = """
import os, signal, sys
from clusterlab import programs
def main(argv):
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # the handler raises SystemExit(75) here
    except SystemExit:
        raise ImportError("IMPORTANT: PLEASE READ THIS FOR ADVICE ON HOW TO SOLVE THIS ISSUE!")
programs.PROGRAMS["starting.py"] = programs.Program("starting.py", "__main__")
programs.run("starting.py", sys.argv[1:])
"""


def test_a_requeue_exit_turned_into_another_error_by_the_code_it_interrupted_is_still_the_requeue():
    done = subprocess.run([PYTHON, "-c", SWALLOWED_EXIT], cwd=ROOT, env=script_env(), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 75, done.stderr
    assert done.stderr.startswith("SIGTERM: stopped where no checkpoint is written") and "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1] == ("(the code the stop signal interrupted raised ImportError on its way out: "
                                            "a consequence of the signal, not a fault of its own)")
    assert "PLEASE READ" not in done.stderr  # (numpy's words sent users off to mend their installation)


# The same inside a training run's directory: status.json said "failed" with the extension's error.
SWALLOWED_EXIT_IN_A_RUN = script_in_a_run("running", """try:
    os.kill(os.getpid(), signal.SIGTERM)
except SystemExit:
    raise ValueError("an extension module's own error")""", outcome="except ValueError:\n    pass")


def test_a_requeue_exit_turned_into_another_error_leaves_the_run_interrupted(tmp_path):
    done = subprocess.run([PYTHON, "-c", SWALLOWED_EXIT_IN_A_RUN, str(tmp_path / "run")], cwd=ROOT, env=script_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.splitlines()[-1] == "interrupted", (done.stdout, done.stderr)
