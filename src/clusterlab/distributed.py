"""One `init()` for every way a run is started, and the collectives the methods share.

Ways a process can be started, checked in this order:
1. torchrun, or submitit after `TorchDistributedEnvironment().export()`: RANK, WORLD_SIZE, LOCAL_RANK,
   MASTER_ADDR and MASTER_PORT are in the environment (env:// rendezvous).
2. a Slurm `srun` step with several tasks: rank, world size and local rank from SLURM_PROCID,
   SLURM_STEP_NUM_TASKS (or SLURM_NTASKS) and SLURM_LOCALID; the master is the first host of
   `scontrol show hostnames` of the step's node list (SLURM_STEP_NODELIST, else SLURM_JOB_NODELIST) and the port
   is derived from the job and step ids, so two jobs or steps sharing a node do not collide and no host name is
   sliced by hand.
3. anything else: a plain single process, no process group.
The backend is nccl on CUDA and gloo on the CPU. Across nodes, gloo connects to the address this host's name
resolves to (GLOO_SOCKET_IFNAME names an interface instead), NCCL picks its interface itself (NCCL_SOCKET_IFNAME
overrides). Before joining, every rank prints where it runs, so a rendezvous that hangs shows which host or address
is wrong. All helpers below are no-ops in a single process.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import ConfigError


@dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(choice: str, local_rank: int = 0) -> torch.device:
    if choice not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device {choice!r} is not one of: auto, cpu, cuda")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is visible (use --device auto or cpu)")
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def port_for_job(job_id: str, step_id: str = "0") -> int:
    """A rendezvous port from the Slurm job id (array ids included) and the step id: two steps of one allocation,
    and jobs of nearby ids sharing a node, get different ports (the 16 steps of each of 748 consecutive jobs), and
    two jobs far apart meet with a chance of 1 in 12,000 (the multiplier 8251 has no factor in common with 12,000
    and spreads nearby ids furthest). In [20000, 32000): above it Linux hands out ports to outgoing connections
    (32768-60999), which could hold it."""
    job, step = (int("".join(ch for ch in str(value) if ch.isdigit()) or "0") for value in (job_id, step_id))
    return 20000 + (8251 * job + step % 16) % 12000


def _slurm_master_address() -> str:
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ["SLURM_JOB_NODELIST"]
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as err:
        # (inside a container scontrol is often missing)
        raise ConfigError(f"cannot find the master host of this srun step: `scontrol show hostnames {nodelist}` "
                          f"failed ({err}); export MASTER_ADDR (the first node's name) before srun") from None
    if not out.stdout.split():
        raise ConfigError(f"cannot find the master host of this srun step: `scontrol show hostnames {nodelist}` "
                          f"printed no host; export MASTER_ADDR (the first node's name) before srun")
    return out.stdout.split()[0]


def _from_environment() -> tuple[int, int, int] | None:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        found = _environment_int("RANK"), _environment_int("WORLD_SIZE"), _environment_int("LOCAL_RANK", 0)
        return _checked_rendezvous(*found)
    tasks = os.environ.get("SLURM_STEP_NUM_TASKS") or os.environ.get("SLURM_NTASKS")
    if "SLURM_PROCID" in os.environ and "SLURM_STEP_ID" in os.environ and tasks and int(tasks) > 1:
        if "MASTER_ADDR" not in os.environ:  # (not setdefault: its argument would run scontrol regardless)
            os.environ["MASTER_ADDR"] = _slurm_master_address()
        os.environ.setdefault("MASTER_PORT", str(port_for_job(os.environ["SLURM_JOB_ID"], os.environ["SLURM_STEP_ID"])))
        return int(os.environ["SLURM_PROCID"]), int(tasks), int(os.environ.get("SLURM_LOCALID", 0))
    for alone, missing in (("WORLD_SIZE", "RANK"), ("RANK", "WORLD_SIZE")):
        # (a stale variable of another session: one process, as asked for, had it said 1 or 0)
        if alone in os.environ and os.environ[alone].strip() not in ("0", "1"):
            raise ConfigError(f"{alone}={os.environ[alone]} is set in the environment, {missing} is not: torchrun "
                              f"sets both (with MASTER_ADDR and MASTER_PORT) in every process it starts; unset "
                              f"{alone} to run one process")
    return None


UNSET_FOR_ONE_PROCESS = "unset RANK and WORLD_SIZE to run one process"


def _environment_int(name: str, default: int | None = None) -> int:
    text = os.environ.get(name)
    if text is None and default is not None:
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r} in the environment is not an integer (torchrun sets RANK, WORLD_SIZE "
                          f"and LOCAL_RANK in every process it starts; {UNSET_FOR_ONE_PROCESS})") from None


def _checked_rendezvous(rank: int, world: int, local: int) -> tuple[int, int, int]:
    """RANK, WORLD_SIZE and LOCAL_RANK of an env:// rendezvous, refused where no process group could come of them:
    a missing MASTER_ADDR ended in torch's traceback, a rank beyond the world retried its connection until the
    30-minute timeout."""
    if world < 1:
        raise ConfigError(f"WORLD_SIZE={world} in the environment: a run has 1 process or more "
                          f"({UNSET_FOR_ONE_PROCESS})")
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} in the environment is not one of the {world} ranks of WORLD_SIZE={world} "
                          f"(0 to {world - 1})")
    if local < 0:
        raise ConfigError(f"LOCAL_RANK={local} in the environment: a local rank is 0 or more")
    if world > 1:
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(name, "").strip():
                raise ConfigError(f"RANK={rank} and WORLD_SIZE={world} are set in the environment, {name} is not: "
                                  f"start the processes with torchrun, or set MASTER_ADDR and MASTER_PORT (the "
                                  f"address and a free port of rank 0's host); {UNSET_FOR_ONE_PROCESS}")
        port = os.environ["MASTER_PORT"].strip()
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"MASTER_PORT={port!r} in the environment is not a port number (1 to 65535)")
    return rank, world, local


def _where() -> str:
    """`host (address)`, the address being what gloo binds to by default; `, Slurm node N` inside a Slurm job."""
    host = socket.gethostname()
    try:
        address = socket.gethostbyname(host)
    except OSError:
        address = "host name does not resolve"
    node = f", Slurm node {os.environ['SLURM_NODEID']}" if "SLURM_NODEID" in os.environ else ""
    return f"{host} ({address}{node})"


def take_device(device: torch.device) -> torch.device:
    """Make a CUDA `device` this process's current one, where collectives put their tensors (rank0_says), and set
    up cuDNN (`configure_cudnn`)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        configure_cudnn()
    return device


def configure_cudnn() -> None:
    """cuDNN times its convolution algorithms once per input shape and keeps the fastest (crops have fixed shapes;
    every upstream sets cudnn.benchmark). Its TF32 convolutions, PyTorch's default from Ampere on (inputs rounded to
    a 10-bit mantissa), are off: a float32 convolution is float32, as on the CPU and on the V100s of the published
    numbers, and as config.yaml's `precision: float32` says; the 16-bit speed is --amp's (bf16 by default there)."""
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = False


_joined = False  # whether this process has joined a process group (`joined_a_group`)


def init(device: str = "auto", timeout_s: int = 1800, flags: dict | None = None) -> Context:
    """Start (or join) the process group this process belongs to and return where it stands; `flags`, the program's
    arguments, must be the same on every process (`require_same_flags`)."""
    global _joined
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", 0))
        context = Context(rank, world, take_device(pick_device(device, local)))
        require_same_flags(flags)
        return context
    found = _from_environment()
    if found is None or found[1] == 1:
        return Context(0, 1, take_device(pick_device(device)))
    rank, world, local = found
    chosen = take_device(pick_device(device, local))
    backend = "nccl" if chosen.type == "cuda" else "gloo"
    # one write with its newline, so that the lines of ranks sharing an output file (srun) do not interleave
    print(f"rank {rank}/{world} (local {local}) on {_where()}: joining {backend} at "
          f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}\n", end="", flush=True)
    # From here on the process ends without the interpreter's finalisation (`joined_a_group`), also where it leaves
    # during the rendezvous: its thread may still wait in torch's C++ code.
    _joined = True
    _join_process_group(backend, rank, world, timeout_s, chosen)
    require_same_flags(flags)
    return Context(rank, world, chosen)


def _join_process_group(backend: str, rank: int, world: int, timeout_s: int,
                        device: torch.device = torch.device("cpu")) -> None:
    """init_process_group, run in a thread of its own while this (the main) thread waits in Python: the rendezvous
    blocks in C++ until every rank has come (or the timeout), and there no Python signal handler runs. A rank waiting
    for one that never came (a wrong MASTER_ADDR, a node that did not start) ignored stop signals and Ctrl-C until
    the 30-minute timeout; only SIGKILL ended it. Its errors become one line each."""
    failure: list[BaseException] = []

    def rendezvous() -> None:
        try:
            if device.type == "cuda":  # (CUDA's current device is a thread's own: NCCL's must not be GPU 0)
                torch.cuda.set_device(device)
            dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=timeout_s))
        except BaseException as err:  # handed to the main thread
            failure.append(err)

    joining = threading.Thread(target=rendezvous, name="rendezvous", daemon=True)
    joining.start()
    while joining.is_alive():
        joining.join(0.1)
    if failure:
        raise _rendezvous_error(failure[0], rank, world) from None


def _rendezvous_error(err: BaseException, rank: int, world: int) -> BaseException:
    """One line for the rendezvous's own failures (torch's errors carry a C++ stack); any other error as it is."""
    where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    words = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, dist.DistNetworkError) and "EADDRINUSE" in words:
        return ConfigError(f"rank {rank} of {world} cannot hold the rendezvous at {where}: MASTER_PORT is in use on "
                           f"this host (another run's rendezvous, or another program); choose a free MASTER_PORT")
    if isinstance(err, dist.DistError) and "timed out" in words.lower():
        waited = ("no other rank joined it in time" if rank == 0 else "rank 0 did not answer there")
        return ConfigError(f"rank {rank} of {world}: the rendezvous at {where} timed out ({words.rstrip('.')}): "
                           f"{waited}; every rank's `joining` line names the address it used, and a rank that never "
                           f"started has no log")
    return err


def require_same_flags(flags: dict | None) -> None:
    """Collective: refuse, on every process, a run whose processes were started with different flags (command lines
    written per rank that differ): they trained under one name with other learning rates or seeds than config.yaml
    records, or met mismatched collectives (a traceback), or waited a minute to blame the file system for two
    --output_dir. The message names the first differing flags and the ranks of each value."""
    if flags is None or not is_initialized():
        return
    texts = every_ranks_text(json.dumps(flags, sort_keys=True, default=str))
    if len(set(texts)) == 1:
        return
    given = [json.loads(text) for text in texts]
    differing = sorted(key for key in set().union(*given)
                       if len({json.dumps(values.get(key), default=str) for values in given}) > 1)
    parts = []
    for key in differing[:3]:
        ranks_of: dict[str, list[int]] = {}
        for process, values in enumerate(given):
            ranks_of.setdefault(json.dumps(values.get(key), default=str), []).append(process)
        parts.append(f"--{key} " + ", ".join(f"{value} on rank(s) {rank_list(ranks)}"
                                             for value, ranks in ranks_of.items()))
    more = f"; and {len(differing) - 3} more" if len(differing) > 3 else ""
    raise ConfigError(f"the processes of this run were started with different flags ({'; '.join(parts)}{more}): "
                      f"start every process with the same command")


def configure_threads() -> None:
    """Honour Slurm's CPU allocation for intra-op threads when nothing else set it."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, int(cpus)))


def joined_a_group() -> bool:
    """Whether this process joined a process group at some point (`init`), destroyed since or not."""
    return _joined


# What gloo's errors say when the far end of a connection is gone (its process died, its node was lost), and when
# it said nothing for the process group's timeout (it stalled, or its node froze). NCCL's words for these were not
# seen here (no GPU): its errors keep their traceback.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer")
_PEER_SILENT = ("Timed out waiting",)


def lost_rank_message(err: BaseException) -> str | None:
    """One line for an error that is another rank's failure seen from this one, in the backend's own words (None
    for any other error): the failure itself, and its traceback, are in that rank's log, not in the copies of this
    one every other rank prints."""
    if not isinstance(err, RuntimeError) or not is_initialized():
        return None
    lines = str(err).strip().splitlines()
    words = lines[0] if lines else ""
    if words.startswith("["):  # gloo's "[.../pair.cc:545] Read error ...": where in gloo's source
        words = words.partition("] ")[2]
    words = words.split(". ")[0].rstrip(".")
    where = f"rank {rank()} of {world_size()}"
    if any(phrase in words for phrase in _PEER_GONE):
        return f"{where} lost another rank ({words}): that rank's log has the first failure"
    if any(phrase in words for phrase in _PEER_SILENT):
        return (f"{where} waited in vain for another rank ({words}): it stalled, or its node is gone; its log "
                "shows where it stopped")
    return None


def shutdown() -> None:
    if is_initialized():
        dist.destroy_process_group()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place; returns the tensor for chaining."""
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    if is_initialized():
        dist.broadcast(tensor, src=src)
    return tensor


def rank0_says(flag: bool) -> bool:
    """Collective: rank 0's `flag` on every rank (the others' is not read), so that all go on or stop together when
    only rank 0 did something that could fail."""
    if not is_initialized():
        return flag
    return bool(broadcast(torch.tensor([int(flag)], device=collective_device())).item())


def collective_device() -> torch.device:
    """Where a small tensor made for a collective must live: the GPU under NCCL, the CPU under gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def rank_list(ranks: list[int]) -> str:
    """`0, 1, 2, 3, ...`: ranks for a message, the first four of them."""
    return ", ".join(map(str, ranks[:4])) + (", ..." if len(ranks) > 4 else "")


def every_ranks_text(text: str) -> list[str]:
    """Collective: each rank's `text`, in rank order."""
    if not is_initialized():
        return [text]
    texts = [None] * world_size()
    dist.all_gather_object(texts, text)
    return texts


def every_ranks(values: list[int]) -> list[list[int]]:
    """Collective: each rank's `values` (as many integers on every rank), in rank order."""
    if not is_initialized():
        return [list(values)]
    return all_gather_cat(torch.tensor([values], dtype=torch.int64, device=collective_device())).tolist()


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equally shaped tensors of all ranks along dim 0, in rank order (no gradient)."""
    if not is_initialized():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def all_gather_uneven(tensor: torch.Tensor) -> torch.Tensor:
    """Like all_gather_cat, for tensors whose first dimension differs between ranks."""
    if not is_initialized():
        return tensor
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = all_gather_cat(size).tolist()
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = all_gather_cat(padded)
    return torch.cat([gathered[i * max(sizes): i * max(sizes) + n] for i, n in enumerate(sizes)])


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor):
        ctx.local_size = tensor.shape[0]
        return all_gather_cat(tensor)

    @staticmethod
    def backward(ctx, grad):
        # Every rank's loss depends on every rank's slice, so the gradient of a slice is the sum over ranks.
        grad = all_reduce_sum(grad.contiguous().clone())
        start = rank() * ctx.local_size
        return grad[start: start + ctx.local_size]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Differentiable all-gather: gradients of the gathered tensor flow back to each rank's own slice."""
    if not is_initialized():
        return tensor
    return _GatherWithGrad.apply(tensor)


class _AllReduceSumWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor):
        return all_reduce_sum(tensor.clone())

    @staticmethod
    def backward(ctx, grad):
        # Each rank's output depends on every rank's input, so the gradient is the sum over ranks.
        return all_reduce_sum(grad.clone())


def all_reduce_sum_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Differentiable sum over ranks (global batch statistics: batch norm, IIC's joint distribution)."""
    if not is_initialized():
        return tensor
    return _AllReduceSumWithGrad.apply(tensor)


def shard_range(total: int) -> range:
    """Contiguous, nearly equal slices of range(total), one per rank (the first ones one longer)."""
    world, me = world_size(), rank()
    base, extra = divmod(total, world)
    start = me * base + min(me, extra)
    return range(start, start + base + (1 if me < extra else 0))
