"""LARS and the learning-rate schedules (optim.py) against naive re-implementations.

LARS runs in float64 here and must match the naive formula to 1e-12; the schedule must match SwAV's numpy
schedule array to 1e-12 at every iteration.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from clusterlab.errors import ConfigError
from clusterlab import optim
from clusterlab.methods.base import split_decay
from clusterlab.optim import LARS, Schedule, set_lr
from dist_utils import single_thread  # noqa: F401 - autouse fixture: one intra-op thread

TRUST, EPS = 0.001, 1e-8


# ---- LARS ------------------------------------------------------------------------------------------------------------

def naive_lars_step(params, grads, buffers, lr, momentum, weight_decay, exclude_1d=False):
    """apex LARC(SGD(momentum, weight_decay), clip=False), one parameter at a time (apex/parallel/LARC.py):
    with both norms non-zero, g <- (g + wd w) * trust ||w|| / (||g|| + wd ||w|| + eps); otherwise g is untouched
    (apex neither decays nor scales it). Then torch SGD momentum (buffer = g at the first step) and w <- w - lr v."""
    new_params, new_buffers = [], []
    for w, g, v in zip(params, grads, buffers):
        if g is None:
            new_params.append(w.clone())
            new_buffers.append(v)
            continue
        g = g.clone()
        if not (exclude_1d and w.ndim == 1):
            w_norm = math.sqrt(sum(x * x for x in w.flatten().tolist()))
            g_norm = math.sqrt(sum(x * x for x in g.flatten().tolist()))
            if w_norm != 0 and g_norm != 0:
                local_lr = TRUST * w_norm / (g_norm + weight_decay * w_norm + EPS)
                g = (g + weight_decay * w) * local_lr
        v = g if v is None else momentum * v + g
        new_params.append(w - lr * v)
        new_buffers.append(v)
    return new_params, new_buffers


def make_params():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(4, 3, generator=g, dtype=torch.float64),   # ordinary weight
            torch.randn(5, generator=g, dtype=torch.float64),      # bias / BN weight (1-D)
            torch.zeros(2, 3, dtype=torch.float64),                # zero norm (e.g. a zero-initialised layer)
            torch.randn(3, 2, generator=g, dtype=torch.float64),   # gets a zero gradient
            torch.randn(2, generator=g, dtype=torch.float64)]      # never gets a gradient


def make_grads(step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(4, 3, generator=g, dtype=torch.float64) * 0.1,
            torch.randn(5, generator=g, dtype=torch.float64),
            torch.randn(2, 3, generator=g, dtype=torch.float64),
            torch.zeros(3, 2, dtype=torch.float64),
            None]


@pytest.mark.parametrize("exclude", [False, True])
@pytest.mark.parametrize("momentum,weight_decay", [(0.9, 1e-6), (0.9, 0.05), (0.0, 0.01)])
def test_lars_matches_naive_formula_over_several_steps(exclude, momentum, weight_decay):
    start = make_params()
    params = [torch.nn.Parameter(p.clone()) for p in start]
    opt = LARS(params, lr=1.0, momentum=momentum, weight_decay=weight_decay, trust_coefficient=TRUST, eps=EPS,
               exclude_bias_and_norm=exclude)
    ref, buffers = [p.clone() for p in start], [None] * len(start)
    for step, lr in enumerate([4.8, 2.0, 0.5, 3.0]):
        grads = make_grads(step)
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        set_lr(opt, lr)
        opt.step()
        ref, buffers = naive_lars_step(ref, grads, buffers, lr, momentum, weight_decay, exclude)
        for got, expected in zip(params, ref):
            torch.testing.assert_close(got.detach(), expected, rtol=0, atol=1e-12)
    # The parameter with a zero gradient and a non-zero norm has not moved at all (no decay: apex semantics).
    torch.testing.assert_close(params[3].detach(), start[3], rtol=0, atol=0)
    torch.testing.assert_close(params[4].detach(), start[4], rtol=0, atol=0)
    assert params[4] not in opt.state


class OperatorCalls(TorchDispatchMode):
    """Counts the tensor operators called (each at least one kernel launch on a GPU) and the values read back to the
    host."""

    def __init__(self):
        super().__init__()
        self.calls, self.reads = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        self.reads += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def calls_of_a_step(num_params: int) -> OperatorCalls:
    """The operators of LARS's second step (the first also creates the momentum buffers) over `num_params` weights."""
    params = [torch.nn.Parameter(torch.randn(3, 2)) for _ in range(num_params)]
    opt = LARS(params, lr=1.0, momentum=0.9, weight_decay=1e-4)
    for step in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        with OperatorCalls() as counted:
            opt.step()
    return counted


def test_lars_step_calls_as_many_operators_for_40_parameters_as_for_4():
    """Multi-tensor operators: a step's operator calls do not grow with the number of parameters (a loop over them
    called 16 per tensor: 2,578 per step for a ResNet-50, bench/ops_speed.py), and it reads nothing back."""
    four, forty = calls_of_a_step(4), calls_of_a_step(40)
    assert four.calls == forty.calls < 40
    assert four.reads == forty.reads == 0


def test_lars_split_into_batches_on_the_cpu_takes_the_same_steps(monkeypatch):
    """On the CPU the multi-tensor operators take the parameters a few at a time (here one or two): the steps are
    still the naive formula's."""
    monkeypatch.setattr(optim, "CPU_BATCH_ELEMENTS", 8)
    start = make_params()
    params = [torch.nn.Parameter(p.clone()) for p in start]
    assert [len(batch) for batch in optim._batches(params)] == [1, 2, 2]  # 12 | 5 + 6 | 6 + 2 elements
    opt = LARS(params, lr=1.0, momentum=0.9, weight_decay=0.01, trust_coefficient=TRUST, eps=EPS)
    ref, buffers = [p.clone() for p in start], [None] * len(start)
    for step, lr in enumerate([4.8, 2.0, 0.5]):
        grads = make_grads(step)
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        set_lr(opt, lr)
        opt.step()
        ref, buffers = naive_lars_step(ref, grads, buffers, lr, 0.9, 0.01)
        for got, expected in zip(params, ref):
            torch.testing.assert_close(got.detach(), expected, rtol=0, atol=1e-12)


def test_lars_steps_parameters_of_several_dtypes_each_in_its_own():
    """A float32 and a float64 parameter in one group (each dtype gets its own multi-tensor operators): both take
    the naive step, and the float32 one stays float32."""
    start = make_params()[:2]
    params = [torch.nn.Parameter(start[0].float()), torch.nn.Parameter(start[1].clone())]
    opt = LARS(params, lr=2.0, momentum=0.9, weight_decay=0.01, trust_coefficient=TRUST, eps=EPS)
    ref, buffers = [p.clone() for p in start], [None, None]
    for step in range(3):
        grads = make_grads(step)[:2]
        params[0].grad, params[1].grad = grads[0].float(), grads[1].clone()
        opt.step()
        ref, buffers = naive_lars_step(ref, grads, buffers, 2.0, 0.9, 0.01)
    assert params[0].dtype == torch.float32
    torch.testing.assert_close(params[0].detach(), ref[0].float(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(params[1].detach(), ref[1], rtol=0, atol=1e-12)


def test_lars_first_step_by_hand():
    """w = (3, 4): ||w|| = 5; g = (0, 1): ||g|| = 1; wd = 0.1: local_lr = 0.001 * 5 / (1 + 0.5 + 1e-8)."""
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    w.grad = torch.tensor([0.0, 1.0], dtype=torch.float64)
    LARS([w], lr=2.0, momentum=0.9, weight_decay=0.1).step()
    local_lr = 0.001 * 5 / (1 + 0.1 * 5 + 1e-8)
    expected = torch.tensor([3.0 - 2.0 * local_lr * 0.3, 4.0 - 2.0 * local_lr * (1 + 0.4)], dtype=torch.float64)
    torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-15)


def test_exclude_bias_and_norm_gives_plain_sgd_for_1d_parameters():
    g = torch.Generator().manual_seed(3)
    bias = torch.randn(6, generator=g, dtype=torch.float64)
    weight = torch.randn(6, 2, generator=g, dtype=torch.float64)
    grads = [torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, 2, generator=g, dtype=torch.float64)]
    results = {}
    for exclude in (False, True):
        params = [torch.nn.Parameter(bias.clone()), torch.nn.Parameter(weight.clone())]
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        LARS(params, lr=0.5, momentum=0.9, weight_decay=0.01, exclude_bias_and_norm=exclude).step()
        results[exclude] = [p.detach() for p in params]
    # Excluded: the bias takes a plain SGD step without decay; the 2-D weight is adapted either way.
    torch.testing.assert_close(results[True][0], bias - 0.5 * grads[0], rtol=0, atol=1e-15)
    torch.testing.assert_close(results[True][1], results[False][1], rtol=0, atol=0)
    # Not excluded (SwAV): the bias is adapted too, so its step is about `trust` times smaller.
    step_in = (results[False][0] - bias).norm() / (0.5 * grads[0].norm())
    assert step_in < 0.01


def test_lars_with_momentum_buffer_survives_state_dict():
    params = [torch.nn.Parameter(p.clone()) for p in make_params()[:2]]
    opt = LARS(params, lr=1.0, momentum=0.9, weight_decay=1e-4)
    for step in range(2):
        for p, g in zip(params, make_grads(step)[:2]):
            p.grad = g.clone()
        opt.step()
    clone = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = LARS(clone, lr=1.0, momentum=0.9, weight_decay=1e-4)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as through a file: no shared buffers
    for o, ps in ((opt, params), (opt2, clone)):
        for p, g in zip(ps, make_grads(5)[:2]):
            p.grad = g.clone()
        o.step()
    for a, b in zip(params, clone):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---- schedules -------------------------------------------------------------------------------------------------------

def swav_numpy_schedule(base_lr, final_lr, epochs, warmup_epochs, start_warmup, iters):
    """main_swav.py's lr_schedule array, verbatim in numpy."""
    warmup = np.linspace(start_warmup, base_lr, iters * warmup_epochs)
    steps = np.arange(iters * (epochs - warmup_epochs))
    cosine = np.array([final_lr + 0.5 * (base_lr - final_lr)
                       * (1 + math.cos(math.pi * t / (iters * (epochs - warmup_epochs)))) for t in steps])
    return np.concatenate((warmup, cosine))


@pytest.mark.parametrize("base,final,epochs,warmup,start,iters", [
    (4.8, 0.0048, 20, 10, 0.3, 7),   # SwAV's ImageNet shape, small
    (0.6, 0.0006, 12, 0, 0.0, 5),    # no warm-up
    (1.0, 0.0, 5, 1, 0.1, 1),        # one warm-up iteration: linspace of length 1 is the start value
    (2.4, 0.1, 9, 2, 0.0, 13),
])
def test_cosine_matches_swav_numpy_schedule(base, final, epochs, warmup, start, iters):
    expected = swav_numpy_schedule(base, final, epochs, warmup, start, iters)
    schedule = Schedule("cosine", base, epochs, iters, final_lr=final, warmup_epochs=warmup, start_warmup=start)
    got = np.array([schedule(i) for i in range(len(expected))])
    assert len(expected) == epochs * iters
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    if warmup > 0:
        assert got[0] == pytest.approx(start, abs=1e-15)
        if warmup * iters > 1:
            assert got[warmup * iters - 1] == pytest.approx(base, abs=1e-12)  # warm-up includes both ends
    assert got[warmup * iters] == pytest.approx(base, abs=1e-12)  # the cosine starts at the base rate


def test_step_schedule_drops_at_the_given_epochs():
    schedule = Schedule("step", 0.03, 10, 4, drops=(7, 4), gamma=0.1)
    for epoch in range(10):
        expected = 0.03 * (1.0 if epoch < 4 else 0.1 if epoch < 7 else 0.01)
        for it in range(4):
            assert schedule(epoch * 4 + it) == pytest.approx(expected, rel=1e-12)


def test_constant_schedule():
    schedule = Schedule("constant", 0.2, 3, 5)
    assert all(schedule(i) == 0.2 for i in range(15))


@pytest.mark.parametrize("kind", ["cosine", "step"])
def test_period_restarts_the_schedule(kind):
    """Super-AND's rounds: every `period` epochs the schedule starts again from its beginning."""
    period, iters = 3, 4
    schedule = Schedule(kind, 0.5, 12, iters, final_lr=0.01, warmup_epochs=1, start_warmup=0.05, drops=(2,),
                        period=period)
    one_round = Schedule(kind, 0.5, period, iters, final_lr=0.01, warmup_epochs=1, start_warmup=0.05, drops=(2,))
    for i in range(12 * iters):
        assert schedule(i) == pytest.approx(one_round(i % (period * iters)), abs=1e-15)
    assert schedule(period * iters) == pytest.approx(0.05, abs=1e-15)  # round 2 begins with the warm-up again
    if kind == "cosine":
        expected = swav_numpy_schedule(0.5, 0.01, period, 1, 0.05, iters)
        np.testing.assert_allclose([schedule(2 * period * iters + i) for i in range(period * iters)], expected,
                                   rtol=0, atol=1e-12)


def test_unknown_schedule_is_refused():
    with pytest.raises(ConfigError, match="--schedule"):
        Schedule("linear", 0.1, 10, 10)


def test_set_lr_honours_lr_scale():
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD([{"params": params[:1]}, {"params": params[1:], "lr_scale": 0.1}], lr=1.0)
    set_lr(opt, 2.0)
    assert [g["lr"] for g in opt.param_groups] == [2.0, pytest.approx(0.2)]


@pytest.mark.parametrize("optimizer", ["lars", "adam"])
def test_nesterov_is_refused_where_the_optimiser_has_none(optimizer):
    from types import SimpleNamespace

    from clusterlab.optim import build_optimizer

    args = SimpleNamespace(optimizer=optimizer, nesterov=True, lr=0.1, momentum=0.9, weight_decay=0.0,
                           lars_trust=0.001, lars_exclude_bias_norm=False)
    with pytest.raises(ConfigError, match=rf"applies to --optimizer sgd only .*--optimizer {optimizer}.*--nesterov false"):
        build_optimizer([torch.nn.Parameter(torch.ones(2))], args)
    sgd = SimpleNamespace(**{**vars(args), "optimizer": "sgd"})
    assert isinstance(build_optimizer([torch.nn.Parameter(torch.ones(2))], sgd), torch.optim.SGD)
    # torch's SGD raised its own multi-line ValueError here (Super-AND's default is Nesterov: --momentum 0 met it)
    without_momentum = SimpleNamespace(**{**vars(sgd), "momentum": 0.0})
    with pytest.raises(ConfigError, match=r"^--nesterov true .* needs a momentum: pass --nesterov false"):
        build_optimizer([torch.nn.Parameter(torch.ones(2))], without_momentum)


# ---- which flags the optimiser and schedule read ----------------------------------------------------------------------

OTHER_VALUES = {"lars_trust": 0.01, "lars_exclude_bias_norm": True, "momentum": 0.5, "lr_drops": [1], "lr_gamma": 0.5,
                "final_lr": 0.05, "start_warmup": 0.02}


def rates_and_weights(args) -> tuple[list[float], list[torch.Tensor]]:
    """The learning rate of every step of a 4-epoch run of 2 steps an epoch, and a weight and a bias after it (the
    same gradients whatever `args`)."""
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(3, 4, generator=generator, dtype=torch.float64, requires_grad=True),
              torch.randn(4, generator=generator, dtype=torch.float64, requires_grad=True)]
    optimizer = optim.build_optimizer(split_decay([("weight", params[0]), ("bias", params[1])],
                                                  args.no_decay_bias_norm), args)
    schedule = optim.build_schedule(args, steps_per_epoch=2)
    rates = []
    for step in range(args.epochs * 2):
        rates.append(schedule(step))
        set_lr(optimizer, rates[-1])
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator, dtype=torch.float64)
        optimizer.step()
    return rates, [p.detach() for p in params]


@pytest.mark.parametrize("optimizer", ["sgd", "lars", "adam"])
@pytest.mark.parametrize("schedule", ["cosine", "step", "constant"])
@pytest.mark.parametrize("warmup_epochs", [0, 1])
@pytest.mark.parametrize("lr_drops", [[], [3]])
@pytest.mark.parametrize("weight_decay, lars_exclude_bias_norm", [(1e-4, False), (0.0, False), (1e-4, True)])
def test_unread_flags_are_exactly_those_that_change_nothing(optimizer, schedule, warmup_epochs, lr_drops,
                                                            weight_decay, lars_exclude_bias_norm):
    """optim.unread_flags, which the programs refuse when given (a run or probe the same as without the flag, under a
    record of its own), against what the optimiser and schedule do: every flag it names changes neither a learning
    rate nor a weight; every flag it does not name changes one."""
    from types import SimpleNamespace

    args = SimpleNamespace(optimizer=optimizer, schedule=schedule, warmup_epochs=warmup_epochs, lr_drops=lr_drops,
                           epochs=4, lr=0.1, final_lr=0.0, start_warmup=0.0, lr_gamma=0.1, schedule_period=0,
                           momentum=0.9, nesterov=False, weight_decay=weight_decay, lars_trust=0.001,
                           lars_exclude_bias_norm=lars_exclude_bias_norm, no_decay_bias_norm=False)
    rates, weights = rates_and_weights(args)
    unread = optim.unread_flags(args)
    assert set(unread) <= set(OTHER_VALUES)
    for flag, value in OTHER_VALUES.items():
        if (flag == "lr_drops" and lr_drops) or (flag == "lars_exclude_bias_norm" and lars_exclude_bias_norm):
            value = type(value)()
        other_rates, other_weights = rates_and_weights(SimpleNamespace(**{**vars(args), flag: value}))
        same = other_rates == rates and all(torch.equal(a, b) for a, b in zip(weights, other_weights))
        assert same == (flag in unread), (flag, value)
