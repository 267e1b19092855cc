"""Distributed equivalence on 2 gloo processes (docs/architecture.md, "Distributed runs do not depend on the world
size").

- GlobalBatchNorm on 2 processes = torch BatchNorm on the concatenated batch in 1 process (outputs, running
  statistics, input and parameter gradients; 1e-5 absolute, uneven splits included).
- all_gather_with_grad: gradients equal the single-process gradients (1e-6); all_gather_uneven, all_gather_cat,
  all_reduce_*, shard_range, broadcast: exact.
- The headline: one SwAV training step (Trainer.train_one_epoch over a one-batch epoch, with a full queue) on 2
  processes with the global batch split gives the same weights, batch-norm statistics and queue as 1 process on the
  full batch (max abs difference < 1e-5), with LARS and with plain SGD (LARS alone would hide a wrong gradient
  scale); a 2-process run with sync_bn off must differ by far more (> 1e-3), so the comparison can fail.
  One step, not several: this tiny SwAV (temperature 0.1, Sinkhorn epsilon 0.05, ReLU kinks) amplifies float32
  rounding by orders of magnitude per step at useful learning rates, so after 2-3 steps 1 and 2 processes drift
  apart by 1e-5..1e-3 although the gradients at equal weights agree to about 1e-5 relative.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import time
import types
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from clusterlab import checkpoint, distributed, engine
from clusterlab.errors import ConfigError
from clusterlab.models.batchnorm import GlobalBatchNorm, convert_sync_batchnorm
from dist_utils import free_port, run_distributed, single_thread  # noqa: F401 - single_thread: autouse fixture

ROOT = Path(__file__).resolve().parents[1]


# ---- GlobalBatchNorm and the collectives: one spawn for all ----------------------------------------------------------

BN_CASES = {  # name: (input shape, split sizes, momentum)
    "2d_even": ((16, 3, 4, 4), (8, 8), 0.1),
    "2d_uneven": ((16, 3, 4, 4), (5, 11), 0.1),
    "1d_cumulative": ((14, 5), (6, 8), None),
}
STEPS = 2  # two training forward/backward passes: running statistics are updated twice


def bn_inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    cases = {}
    for name, (shape, sizes, momentum) in BN_CASES.items():
        channels = shape[1]
        cases[name] = {
            "x": [torch.randn(*shape, generator=g) * 2 + 1 for _ in range(STEPS)],  # mean 1, std 2
            "r": [torch.randn(*shape, generator=g) for _ in range(STEPS)],  # loss = sum(out * r)
            "weight": torch.rand(channels, generator=g) + 0.5, "bias": torch.randn(channels, generator=g),
            "sizes": sizes, "momentum": momentum,
        }
    return cases


def make_bn(cls, case):
    bn = cls(case["weight"].shape[0], momentum=case["momentum"])
    with torch.no_grad():
        bn.weight.copy_(case["weight"])
        bn.bias.copy_(case["bias"])
    return bn


def run_bn(bn, xs, rs):
    """STEPS training passes with the weighted-sum loss, then one eval pass on the first input."""
    outs, x_grads = [], []
    for x, r in zip(xs, rs):
        x = x.clone().requires_grad_()
        out = bn(x)
        (out * r).sum().backward()
        outs.append(out.detach())
        x_grads.append(x.grad)
    bn.eval()
    with torch.no_grad():
        evaluated = bn(xs[0])
    return {"out": outs, "x_grad": x_grads, "weight_grad": bn.weight.grad, "bias_grad": bn.bias.grad,
            "running_mean": bn.running_mean, "running_var": bn.running_var,
            "tracked": int(bn.num_batches_tracked), "eval": evaluated}


def half_bn_input(dtype: torch.dtype) -> torch.Tensor:
    """An fp16/bf16 activation (as a convolution gives under autocast) whose per-channel sum on one rank, 64 x 16 x 16
    values of mean 5, is above fp16's largest value 65504."""
    g = torch.Generator().manual_seed(5)
    return (torch.randn(128, 2, 16, 16, generator=g) * 2 + 5).to(dtype)


X_GATHER = torch.randn(10, 3, generator=torch.Generator().manual_seed(7))
W_GATHER = torch.rand(10, generator=torch.Generator().manual_seed(8))


def gather_loss(queries: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A contrastive-style loss: each query against all keys (queries are a slice of the keys)."""
    return (weights * torch.logsumexp(queries @ keys.t() / 0.5, dim=1)).sum()


def _collectives_worker(rank, world, cases):
    out = {"bn": {}}
    for name, case in cases.items():
        start = sum(case["sizes"][:rank])
        rows = slice(start, start + case["sizes"][rank])
        bn = make_bn(GlobalBatchNorm, case)
        out["bn"][name] = run_bn(bn, [x[rows] for x in case["x"]], [r[rows] for r in case["r"]])
    for dtype in (torch.float16, torch.bfloat16):
        bn = GlobalBatchNorm(2)
        y = bn(half_bn_input(dtype)[64 * rank: 64 * rank + 64])
        out[f"bn_{dtype}"] = {"out": y.detach(), "running_mean": bn.running_mean, "running_var": bn.running_var}
    # convert_sync_batchnorm: every BatchNorm replaced, parameters, statistics and modes kept.
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        model[1].running_mean.fill_(0.3)
        model[4].weight.fill_(2.0)
    model[4].requires_grad_(False).eval()  # frozen, as the linear probe's backbone
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weight = model[1].weight
    converted = convert_sync_batchnorm(model, torch.device("cpu"))
    out["converted_types"] = [type(m).__name__ for m in converted]
    out["converted_same_state"] = all(torch.equal(before[k], v) for k, v in converted.state_dict().items())
    out["converted_kept"] = (converted[1].weight is weight, converted[1].training, converted[1].weight.requires_grad,
                             converted[4].training, converted[4].weight.requires_grad)
    # all_gather_with_grad: each rank owns the loss terms of its own rows.
    local = X_GATHER[5 * rank: 5 * rank + 5].clone().requires_grad_()
    gathered = distributed.all_gather_with_grad(local)
    gather_loss(local, gathered, W_GATHER[5 * rank: 5 * rank + 5]).backward()
    out["gathered"], out["gather_grad"] = gathered.detach(), local.grad
    # The plain collectives.
    out["uneven"] = distributed.all_gather_uneven(torch.arange(3 + 2 * rank).repeat(2, 1).t() + 10 * rank)
    out["uneven_empty"] = distributed.all_gather_uneven(torch.full((4 * rank, 2), 7.0))
    out["cat"] = distributed.all_gather_cat(torch.tensor([[rank, 1.0]]))
    out["sum"] = distributed.all_reduce_sum(torch.tensor([rank + 1.0, 2.0]))
    out["max"] = distributed.all_reduce_max(torch.tensor([float(rank), -float(rank)]))
    out["broadcast"] = distributed.broadcast(torch.tensor([rank + 5.0]), src=1)
    # --skip_recorded: a record only rank 0 read (another job appended it in between) is evaluated by both ranks
    out["found"] = engine.found_on_every_rank([True, rank == 0, False], torch.device("cpu"))
    # (start, stop) pairs: results travel back through torch.save / torch.load(weights_only=True), which has no range
    out["shards"] = [(shard.start, shard.stop) for shard in map(distributed.shard_range, (7, 8, 1, 0))]
    # Each rank's torch generator, saved and restored: ranks that drew differently (dropout over shares of uneven
    # size) go on drawing as they would have.
    torch.manual_seed(0)
    torch.rand(rank + 1)
    out["generators"] = checkpoint.every_ranks_torch_generators()
    out["next_draws"] = torch.rand(3)
    torch.rand(100)
    checkpoint.set_torch_generators(out["generators"][rank])
    out["draws_after_restore"] = torch.rand(3)
    ctx = distributed.init("cpu")
    out["context"] = (ctx.rank, ctx.world_size, ctx.is_main, distributed.rank(), distributed.world_size())
    return out


@pytest.fixture(scope="module")
def collectives():
    cases = bn_inputs()
    return cases, run_distributed(_collectives_worker, 2, cases)


@pytest.mark.parametrize("name", sorted(BN_CASES))
def test_global_batchnorm_equals_batchnorm_on_the_concatenated_batch(collectives, name):
    cases, results = collectives
    case = cases[name]
    cls = nn.BatchNorm2d if len(BN_CASES[name][0]) == 4 else nn.BatchNorm1d
    ref = run_bn(make_bn(cls, case), case["x"], case["r"])
    two = [r["bn"][name] for r in results]
    close = dict(rtol=0, atol=1e-5)
    for step in range(STEPS):
        torch.testing.assert_close(torch.cat([t["out"][step] for t in two]), ref["out"][step], **close)
        torch.testing.assert_close(torch.cat([t["x_grad"][step] for t in two]), ref["x_grad"][step], **close)
    # Each rank's parameter gradient is its share; DDP's average times the world size is their sum.
    torch.testing.assert_close(two[0]["weight_grad"] + two[1]["weight_grad"], ref["weight_grad"], **close)
    torch.testing.assert_close(two[0]["bias_grad"] + two[1]["bias_grad"], ref["bias_grad"], **close)
    for t in two:  # the statistics are global: identical on both ranks, and equal to torch's (unbiased variance)
        torch.testing.assert_close(t["running_mean"], ref["running_mean"], **close)
        torch.testing.assert_close(t["running_var"], ref["running_var"], **close)
        assert t["tracked"] == ref["tracked"] == STEPS
    # Eval mode uses the running statistics, sample by sample.
    torch.testing.assert_close(torch.cat([t["eval"] for t in two]), ref["eval"], **close)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_global_batchnorm_on_half_precision_input_equals_batchnorm(collectives, dtype):
    """Under autocast the input is fp16 or bf16: the statistics must not overflow (fp16) or lose the count (bf16),
    and the output keeps the input's dtype, as torch's batch norm does."""
    _, results = collectives
    ref_bn = nn.BatchNorm2d(2)
    ref = ref_bn(half_bn_input(dtype))
    two = [r[f"bn_{dtype}"] for r in results]
    for t in two:
        torch.testing.assert_close(t["running_mean"], ref_bn.running_mean, rtol=0, atol=1e-5)
        torch.testing.assert_close(t["running_var"], ref_bn.running_var, rtol=0, atol=1e-5)
    got = torch.cat([t["out"] for t in two])
    torch.testing.assert_close(got.float(), ref.float(), rtol=0, atol=8 * torch.finfo(dtype).eps)  # 1 ulp at 4..8
    assert all(t["out"].dtype == dtype for t in two)


def test_global_batchnorm_statistics_are_not_local(collectives):
    """Guard against a vacuous comparison: a rank's local batch statistics differ clearly from the global ones."""
    cases, results = collectives
    case = cases["2d_uneven"]
    local = make_bn(nn.BatchNorm2d, case)
    local(case["x"][0][:5])
    assert (local.running_mean - results[0]["bn"]["2d_uneven"]["running_mean"]).abs().max() > 1e-2


def test_convert_sync_batchnorm(collectives):
    _, results = collectives
    for r in results:
        assert r["converted_types"] == ["Conv2d", "GlobalBatchNorm", "Flatten", "Linear", "GlobalBatchNorm"]
        assert r["converted_same_state"]
        # the same parameter objects, modes and requires_grad (a frozen batch norm in eval mode stays so)
        assert r["converted_kept"] == (True, True, True, False, False)


def test_convert_is_a_no_op_in_one_process():
    model = nn.Sequential(nn.BatchNorm1d(3))
    assert type(convert_sync_batchnorm(model, torch.device("cpu"))[0]) is nn.BatchNorm1d


def test_all_gather_with_grad_gives_the_single_process_gradient(collectives):
    _, results = collectives
    x = X_GATHER.clone().requires_grad_()
    gather_loss(x, x, W_GATHER).backward()
    for r in results:
        torch.testing.assert_close(r["gathered"], X_GATHER, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([r["gather_grad"] for r in results]), x.grad, rtol=0, atol=1e-6)


def test_plain_collectives(collectives):
    _, results = collectives
    uneven = torch.cat([torch.arange(3).repeat(2, 1).t(), torch.arange(5).repeat(2, 1).t() + 10])
    for r in results:
        torch.testing.assert_close(r["uneven"], uneven, rtol=0, atol=0)
        torch.testing.assert_close(r["uneven_empty"], torch.full((4, 2), 7.0), rtol=0, atol=0)
        torch.testing.assert_close(r["cat"], torch.tensor([[0.0, 1.0], [1.0, 1.0]]))
        torch.testing.assert_close(r["sum"], torch.tensor([3.0, 4.0]))
        torch.testing.assert_close(r["max"], torch.tensor([1.0, 0.0]))
        torch.testing.assert_close(r["broadcast"], torch.tensor([6.0]))
        assert r["found"] == [True, False, False]
    assert results[0]["shards"] == [(0, 4), (0, 4), (0, 1), (0, 0)]
    assert results[1]["shards"] == [(4, 7), (4, 8), (1, 1), (0, 0)]
    assert [r["context"] for r in results] == [(0, 2, True, 0, 2), (1, 2, False, 1, 2)]
    saved = results[0]["generators"]
    assert saved.shape[0] == 2 and torch.equal(saved, results[1]["generators"]) and not torch.equal(*saved)
    for r in results:
        assert torch.equal(r["draws_after_restore"], r["next_draws"])
    assert not torch.equal(results[0]["next_draws"], results[1]["next_draws"])


def test_helpers_are_no_ops_in_one_process():
    t = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce_sum(t) is t and distributed.all_gather_with_grad(t) is t
    assert distributed.shard_range(5) == range(0, 5) and distributed.world_size() == 1


SRUN_STEP = {"SLURM_PROCID": "5", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8",
             "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "node[01-03,07]", "SLURM_JOB_ID": "123456"}


def srun_environment(monkeypatch, hosts):
    """SRUN_STEP as the only launcher variables; `scontrol show hostnames` prints `hosts` (None: no scontrol).
    Returns the list of scontrol calls."""
    calls = []

    def scontrol(command, **kwargs):
        calls.append(command)
        if hosts is None:
            raise FileNotFoundError(2, "No such file or directory", "scontrol")
        return types.SimpleNamespace(stdout="\n".join(hosts) + "\n")

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_STEP_NODELIST"):
        monkeypatch.setenv(name, "")  # recorded, so that what the call sets is taken back after the test
        monkeypatch.delenv(name)
    for name, value in SRUN_STEP.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(distributed.subprocess, "run", scontrol)
    return calls


def test_srun_step_environment(monkeypatch):
    calls = srun_environment(monkeypatch, ["node01", "node02", "node03", "node07"])
    assert distributed._from_environment() == (5, 8, 1)
    assert calls == [["scontrol", "show", "hostnames", "node[01-03,07]"]]
    assert os.environ["MASTER_ADDR"] == "node01" and os.environ["MASTER_PORT"] == "23456"  # 20000 + 8251*123456 % 12000


def test_rendezvous_ports_differ_between_steps_and_nearby_jobs():
    """Two srun steps of one allocation had the same port (the second failed, or joined the first's group); so did
    jobs 40000 apart. Every step 0..15 of 748 consecutive jobs gets its own port, below the ephemeral range, and
    jobs far apart meet by chance only (1 in 12,000)."""
    ports = {distributed.port_for_job(str(job), str(step)) for job in range(5000, 5748) for step in range(16)}
    assert len(ports) == 748 * 16 and min(ports) >= 20000 and max(ports) < 32768
    base = distributed.port_for_job("1000000")
    meeting = [d for d in range(1000, 13000) if distributed.port_for_job(str(1000000 + d)) == base]
    assert meeting == [12000]  # 1 in 12,000 job ids further off (16 * id met every 750th)
    assert distributed.port_for_job("5001_3", "1") == distributed.port_for_job("50013", "1")  # an array task's id


def test_srun_step_keeps_a_given_master_address_without_scontrol(monkeypatch):
    """MASTER_ADDR exported (e.g. in a container without scontrol): scontrol is not even run."""
    calls = srun_environment(monkeypatch, None)
    monkeypatch.setenv("MASTER_ADDR", "node03")
    assert distributed._from_environment() == (5, 8, 1)
    assert calls == [] and os.environ["MASTER_ADDR"] == "node03"


@pytest.mark.parametrize("hosts,words", [(None, "No such file"), ([], "printed no host")])
def test_srun_step_without_scontrol_is_one_line_naming_master_addr(monkeypatch, hosts, words):
    """scontrol missing (a container), or printing nothing (an IndexError traceback before)."""
    srun_environment(monkeypatch, hosts)
    with pytest.raises(ConfigError, match="MASTER_ADDR") as caught:
        distributed._from_environment()
    assert "\n" not in str(caught.value) and "node[01-03,07]" in str(caught.value) and words in str(caught.value)


LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_STEP_ID")


def launch_environment(monkeypatch, **variables):
    """Exactly `variables` as the launcher variables of this process."""
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize("variables, words", [
    # torch's traceback ("environment variable MASTER_ADDR expected, but not set")
    ({"RANK": "0", "WORLD_SIZE": "2"}, "RANK=0 and WORLD_SIZE=2 are set in the environment, MASTER_ADDR is not"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}, "MASTER_PORT is not"),
    # a rank beyond the world retried its connection until the 30-minute timeout
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
     "RANK=2 in the environment is not one of the 2 ranks of WORLD_SIZE=2 (0 to 1)"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE=0 in the environment: a run has 1 process or more"),
    ({"RANK": "first", "WORLD_SIZE": "2"}, "RANK='first' in the environment is not an integer"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "port"},
     "MASTER_PORT='port' in the environment is not a port number (1 to 65535)"),
    # one process without a word, where two were asked for
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set in the environment, RANK is not: torchrun sets both"),
])
def test_launcher_variables_no_process_group_can_come_of_are_one_line(monkeypatch, variables, words):
    launch_environment(monkeypatch, **variables)
    with pytest.raises(ConfigError) as caught:
        distributed._from_environment()
    assert words in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("variables", [{}, {"WORLD_SIZE": "1"}, {"RANK": "0"}, {"RANK": "0", "WORLD_SIZE": "1"}])
def test_launcher_variables_of_one_process_start_one(monkeypatch, variables):
    launch_environment(monkeypatch, **variables)
    assert distributed._from_environment() in (None, (0, 1, 0))


def test_a_rendezvous_on_a_port_in_use_is_one_line(monkeypatch):
    """rank 0 of a run whose MASTER_PORT another run's rendezvous holds: torch's DistNetworkError with a C++ stack."""
    port = free_port()
    other_run = torch.distributed.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    launch_environment(monkeypatch, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    with pytest.raises(ConfigError) as caught:
        distributed._join_process_group("gloo", 0, 2, 5)
    assert str(caught.value) == (f"rank 0 of 2 cannot hold the rendezvous at 127.0.0.1:{port}: MASTER_PORT is in use "
                                 f"on this host (another run's rendezvous, or another program); choose a free "
                                 f"MASTER_PORT")
    del other_run


def test_a_rendezvous_rank_0_never_answers_times_out_in_one_line(monkeypatch):
    launch_environment(monkeypatch, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    with pytest.raises(ConfigError) as caught:
        distributed._join_process_group("gloo", 1, 2, 1)
    assert str(caught.value).startswith(f"rank 1 of 2: the rendezvous at {os.environ['MASTER_ADDR']}:"
                                        f"{os.environ['MASTER_PORT']} timed out (")
    assert "rank 0 did not answer there" in str(caught.value) and "\n" not in str(caught.value)
    assert not distributed.is_initialized()


# ---- the headline: one SwAV step on 2 processes = 1 process on the full batch ----------------------------------------

RUNS = {  # name: (optimizer, lr, hidden_mlp, sync_bn)
    # LARS as SwAV (every parameter adapted). No hidden layer here: the bias of a Linear followed by BatchNorm has a
    # zero gradient up to rounding, and LARS rescales that rounding noise to a full step (lr * trust * ||b||), so
    # that one parameter cannot match across world sizes. The SGD run covers the projection's BatchNorm1d.
    "lars": ("lars", 0.3, 0, True),
    "sgd": ("sgd", 0.01, 16, True),
    "lars_local_bn": ("lars", 0.3, 0, False),  # negative control: must NOT match the single process
}
QUEUE_LENGTH, BATCH = 32, 16


def swav_args(output_dir: Path, optimizer: str, lr: float, hidden_mlp: int, sync_bn: bool):
    from clusterlab.programs.train import parse_args
    return parse_args("pretrain", [
        "--method", "swav", "--dataset", "digits", "--arch", "resnet18_cifar", "--width", "8",
        "--hidden_mlp", str(hidden_mlp), "--feat_dim", "8", "--nmb_prototypes", "10", "--temperature", "0.1",
        "--batch_size", str(BATCH), "--epochs", "2", "--optimizer", optimizer, "--lr", str(lr),
        "--warmup_epochs", "0", "--weight_decay", "1e-6", "--momentum", "0.9",
        "--nmb_crops", "2", "2", "--size_crops", "8", "6", "--min_scale_crops", "0.3", "0.2",
        "--max_scale_crops", "1", "0.5", "--queue_length", str(QUEUE_LENGTH), "--epoch_queue_starts", "0",
        "--freeze_prototypes_niters", "0", "--sync_bn", str(sync_bn).lower(), "--device", "cpu", "--seed", "3",
        "--output_dir", str(output_dir), "--log_every", "100"])


def global_queue_state() -> dict:
    """A full global queue of unit embeddings, as a checkpoint holds it (loaded on 1 or 2 ranks)."""
    g = torch.Generator().manual_seed(11)
    embeddings = torch.nn.functional.normalize(torch.randn(2, QUEUE_LENGTH, 8, generator=g), dim=2)
    return {"embeddings": embeddings, "filled": QUEUE_LENGTH}


def build_swav(output_dir: Path, optimizer: str, lr: float, hidden_mlp: int, sync_bn: bool):
    from clusterlab import data, engine
    from clusterlab.methods import METHODS, DataInfo

    args = swav_args(output_dir, optimizer, lr, hidden_mlp, sync_bn)
    ctx = distributed.init(args.device)
    engine.seed_everything(args.seed)
    train_set = data.load("digits", "train", None, False).subset(range(BATCH))  # one global batch: one step
    method = METHODS["swav"](args, DataInfo.of(train_set), ctx.device)
    return args, ctx, train_set, method


def swav_step(output_dir: Path, *spec) -> dict:
    """One Trainer step (through train_one_epoch: batches, offsets, augmentation, DDP, backward, optimiser) on 16
    digits images, with a full queue, so that the Sinkhorn solves over the global batch and the global queue."""
    from clusterlab import engine

    args, ctx, train_set, method = build_swav(output_dir, *spec)
    method.load_extra_state({"queue": global_queue_state()})
    output_dir.mkdir(parents=True, exist_ok=True)
    trainer = engine.Trainer(method, args, ctx, output_dir, train_set)
    assert trainer.steps_per_epoch == 1 and method.queue.full
    trainer.train_one_epoch(0)
    log = output_dir / "train_log.jsonl"  # rank 0 writes it before train_one_epoch returns
    return {"model": {k: v.detach().clone() for k, v in method.state_dict().items()},
            "queue": method.extra_state()["queue"],  # collective
            "global_step": trainer.global_step, "augment": method.augment.state_dict()["generator"],
            "log": [json.loads(line) for line in log.read_text().splitlines()] if ctx.is_main else []}


def _swav_worker(rank, world, tmp):
    return {name: swav_step(Path(tmp) / f"{name}_w{world}", *spec) for name, spec in RUNS.items()}


@pytest.fixture(scope="module")
def swav_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("swav_equivalence")
    two = run_distributed(_swav_worker, 2, str(tmp))
    one = {name: swav_step(tmp / f"{name}_w1", *spec) for name, spec in RUNS.items() if spec[3]}
    return one, two


def max_state_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].numel())


@pytest.mark.parametrize("run", ["lars", "sgd"])
def test_swav_step_on_two_processes_equals_one_process(swav_runs, run):
    one, two = swav_runs
    reference = one[run]
    for rank in range(2):
        got = two[rank][run]
        assert got["global_step"] == reference["global_step"] == 1
        assert max_state_difference(got["model"], reference["model"]) < 1e-5
        # The gathered global queue is the single process's queue: this batch in front, then the oldest rows.
        torch.testing.assert_close(got["queue"]["embeddings"], reference["queue"]["embeddings"], rtol=0, atol=1e-5)
        assert got["queue"]["filled"] == reference["queue"]["filled"] == QUEUE_LENGTH
        torch.testing.assert_close(reference["queue"]["embeddings"][:, BATCH:],
                                   global_queue_state()["embeddings"][:, :QUEUE_LENGTH - BATCH], rtol=0, atol=0)
        assert torch.equal(got["augment"], reference["augment"])  # the crop generators stayed in step
    # The step really moved the weights (the comparison is not between two untouched models).
    _, _, _, untouched = build_swav(Path("unused"), *RUNS[run])
    start = {k: v.detach() for k, v in untouched.state_dict().items()}
    assert max_state_difference(reference["model"], start) > 1e-3


@pytest.mark.parametrize("run", ["lars", "sgd"])
def test_logged_loss_on_two_processes_is_the_global_batch_loss(swav_runs, run):
    """train_log.jsonl (the step record and the epoch's mean) holds the loss of the global batch, as one process
    logs it, not rank 0's half of the batch."""
    one, two = swav_runs
    reference, got = one[run]["log"], two[0][run]["log"]
    assert [set(r) for r in got] == [set(r) for r in reference] and len(got) == 2
    for ours, theirs in zip(got, reference):
        for key in ("loss", "swav", "swav_mean"):
            if key in theirs:
                assert ours[key] == pytest.approx(theirs[key], abs=1e-5), key


def _local_bn_worker(rank, world, tmp):
    from clusterlab import engine

    out = Path(tmp) / "local_bn"
    args, ctx, train_set, method = build_swav(out, *RUNS["lars_local_bn"])
    method.load_extra_state({"queue": global_queue_state()})
    out.mkdir(parents=True, exist_ok=True)
    trainer = engine.Trainer(method, args, ctx, out, train_set)
    trainer.train_one_epoch(0)

    def statistics():
        return {k: v.clone() for k, v in method.state_dict().items() if "running" in k or "num_batches" in k}

    before = statistics()
    trainer.save(1, 0)
    return before, statistics()


def test_without_sync_bn_every_rank_takes_rank_0s_running_statistics_when_saved(tmp_path):
    """Each rank's batch norms follow their own shares; the checkpoint keeps rank 0's, and from then on every rank
    has them (eval-mode passes normalise each share alike, and a resumed run equals one that went on)."""
    (before_0, after_0), (before_1, after_1) = run_distributed(_local_bn_worker, 2, str(tmp_path))
    assert max_state_difference(before_0, before_1) > 1e-4
    assert max_state_difference(after_0, before_0) == 0 and max_state_difference(after_1, before_0) == 0


def test_local_batchnorm_breaks_the_equivalence(swav_runs):
    """Negative control: without sync_bn the 2-process result differs from the single process by far more than the
    tolerance above, so that test can fail."""
    one, two = swav_runs
    assert max_state_difference(two[0]["lars_local_bn"]["model"], one["lars"]["model"]) > 1e-3


# ---- the harness itself ----------------------------------------------------------------------------------------------

def abort_on_exit(rank: int, world_size: int, when: str) -> int:
    """Rank 0 would die by SIGABRT: in the interpreter's finalisation (an atexit handler), or before returning."""
    import atexit

    if rank == 0 and when == "after":
        atexit.register(os.abort)
    if rank == 0 and when == "before":
        os.abort()
    return rank + 10


def test_run_distributed_workers_skip_the_finalisation_where_gloo_aborted_them():
    assert run_distributed(abort_on_exit, 2, "after") == [10, 11]
    with pytest.raises(torch.multiprocessing.ProcessExitedException, match="SIGABRT"):
        run_distributed(abort_on_exit, 2, "before")


# ---- the class-assignment heads' loss sums across a resume ------------------------------------------------------------

def resumed_head_losses(rank: int, world_size: int) -> tuple[list[float], list[float]]:
    """Every rank's per-step losses of 3 heads over a 12-step epoch: once straight, once saved after step 5 and
    loaded into a fresh method (as every rank loads rank 0's checkpoint), then the rest."""
    from clusterlab.methods.cluster_base import ClusterMethod

    def __init__(self):
        self.device, self._loss_sums, self._loss_count = torch.device("cpu"), None, 0
        self.last_head_losses, self.pretrained_from = [], None

    # ClusterMethod's own functions (the loss bookkeeping among them) on an object without a model
    HeadLosses = type("HeadLosses", (), {**{name: value for name, value in vars(ClusterMethod).items()
                                            if isinstance(value, types.FunctionType)}, "__init__": __init__})

    steps = list(torch.rand(12, 3, generator=torch.Generator().manual_seed(rank)) * 3)
    straight = HeadLosses()
    for losses in steps:
        straight.record_head_losses(list(losses))
    straight.on_epoch_end(0)
    stopped = HeadLosses()
    for losses in steps[:5]:
        stopped.record_head_losses(list(losses))
    resumed = HeadLosses()
    resumed.load_extra_state(stopped.extra_state())  # the same on every rank, as rank 0 saves it
    for losses in steps[5:]:
        resumed.record_head_losses(list(losses))
    resumed.on_epoch_end(0)
    return straight.last_head_losses, resumed.last_head_losses


def test_a_resumed_epoch_sums_the_heads_losses_as_a_run_never_stopped():
    """The chosen head rests on float32 sums of every rank's losses. A resume gave rank 0 the sum over all ranks and
    the others zero, so the sums were grouped otherwise: the heads' means moved by a float32 ulp or two, enough to
    flip a near-tie. Each rank now goes on from its own sums: equal to the last bit."""
    for straight, resumed in run_distributed(resumed_head_losses, 2):
        assert resumed == straight


def test_a_cuda_device_is_made_current_with_cudnn_autotuning(monkeypatch):
    made_current = []
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    assert distributed.take_device(torch.device("cpu")) == torch.device("cpu")
    assert made_current == [] and not torch.backends.cudnn.benchmark
    assert distributed.take_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert made_current == [torch.device("cuda", 1)] and torch.backends.cudnn.benchmark


def _wrap_recording_warnings(rank, world_size):
    import warnings

    from clusterlab import engine

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.wrap_ddp(nn.Linear(2, 2), distributed.init("cpu"), find_unused=False)
    return [str(warning.message) for warning in caught]


def test_ddp_wraps_without_torchs_deprecation_warning_on_every_rank():
    """broadcast_buffers=False stays (its replacement broadcasts the buffers once at the start), its warning not."""
    assert run_distributed(_wrap_recording_warnings, 2) == [[], []]


def _flags_check(rank: int, world: int, flags_of_rank) -> str | None:
    try:
        distributed.init("cpu", flags=flags_of_rank[rank])
    except ConfigError as refused:
        return str(refused)
    return None


def test_processes_started_with_different_flags_are_refused_on_every_rank():
    """Command lines written per rank that differ (another --lr or --seed, another --output_dir) trained under one
    name, met mismatched collectives, or waited a minute to blame the file system."""
    same = {"lr": 4.8, "seed": 0, "output_dir": "runs/a", "size_crops": [20]}
    assert run_distributed(_flags_check, 3, [same, same, same]) == [None, None, None]
    other = [same, {**same, "lr": 0.1, "seed": 5}, {**same, "output_dir": "runs/b"}]
    messages = run_distributed(_flags_check, 3, other)
    assert messages[0] == messages[1] == messages[2] == (
        'the processes of this run were started with different flags (--lr 4.8 on rank(s) 0, 2, 0.1 on rank(s) 1; '
        '--output_dir "runs/a" on rank(s) 0, 1, "runs/b" on rank(s) 2; --seed 0 on rank(s) 0, 2, 5 on rank(s) 1): '
        'start every process with the same command')


def _waiting_for_a_stalled_rank(rank: int, world: int) -> list | None:
    quick = torch.distributed.new_group(timeout=datetime.timedelta(seconds=1))
    if rank == 1:
        time.sleep(4)  # stalled past the group's timeout
        return None
    try:
        torch.distributed.all_reduce(torch.ones(2), group=quick)
    except RuntimeError as err:
        return [distributed.lost_rank_message(err), distributed.lost_rank_message(RuntimeError("CUDA out of memory"))]
    return ["no timeout"]


def test_a_rank_silent_for_the_groups_timeout_is_named_on_one_line():
    """A rank that stalls (a hung file system, a frozen node) leaves the others waiting in a collective; at the
    group's timeout gloo's error says "Timed out waiting": the one line says another rank stalled. An error of
    this rank's own is not taken for another rank's."""
    message, own_error = run_distributed(_waiting_for_a_stalled_rank, 2)[0]
    assert re.fullmatch(r"rank 0 of 2 waited in vain for another rank \(Timed out waiting 1000ms for recv operation "
                        r"to complete\): it stalled, or its node is gone; its log shows where it stopped", message)
    assert own_error is None
