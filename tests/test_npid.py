"""NPID (methods/npid.py, losses/npid.py).

- the full non-parametric softmax and the NCE loss against naive loops over the written-out formulas (1e-5);
- Z: estimated once, on the first batch, as N * mean(exp(v . f / T)) over its K + 1 columns (own index first),
  recomputed here by hand from the same noise draws (1e-5), then unchanged by later steps and kept through the
  state dict (a fresh model with a loaded Z does not estimate again);
- the noise generator's state travels in random_state, so a resumed step draws the same negatives (exact);
- defaults of `--method npid` (the lemniscate README's CIFAR command), the embedding / features / memory_bank interface, bad flags;
- one Trainer step on 2 gloo processes (each half the global batch, DDP, global batch norm) gives the weights,
  bank and Z of 1 process on the whole batch (1e-5), for the full softmax and for NCE.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clusterlab import distributed, engine
from clusterlab.data import ImageSet
from clusterlab.errors import ConfigError
from clusterlab.losses.npid import instance_softmax_loss, nce_loss, nce_scores
from clusterlab.methods import METHODS, Batch, DataInfo, Progress
from conftest import ROOT, entry_module
from dist_utils import run_distributed, single_thread  # noqa: F401 - single_thread: autouse fixture

main_pretrain = entry_module("main_pretrain")
TINY = ["--method", "npid", "--dataset", "digits", "--width", "4", "--device", "cpu", "--seed", "3"]


def npid_args(*extra: str):
    return main_pretrain.parse_args([*TINY, *extra])


def images(n: int = 64, seed: int = 0) -> ImageSet:
    """n random grey 8 x 8 images (no data files or scikit-learn: the 2-process workers start faster)."""
    g = torch.Generator().manual_seed(seed)
    return ImageSet("fake", "train", torch.arange(n) % 10, 10, 1, 8, (0.5,), (0.25,), [str(c) for c in range(10)],
                    images=torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8))


def build(*extra: str):
    train = images()
    return METHODS["npid"](npid_args(*extra), DataInfo.of(train), torch.device("cpu")), train


def batch_of(train, indices: list[int]) -> Batch:
    idx = torch.tensor(indices)
    return Batch(train.images[idx], train.labels[idx], idx, len(indices), 0)


# ---- losses against the formulas -------------------------------------------------------------------------------------

def test_full_softmax_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    f, bank, t = torch.randn(5, 3, generator=g), torch.randn(7, 3, generator=g), 0.25
    own = torch.tensor([0, 6, 3, 3, 1])
    naive = 0.0
    for b in range(5):
        logits = [sum(f[b, d].item() * bank[j, d].item() for d in range(3)) / t for j in range(7)]
        naive -= math.log(math.exp(logits[own[b]]) / sum(math.exp(value) for value in logits))
    assert abs(instance_softmax_loss(f, bank, own, t).item() - naive / 5) < 1e-5


def test_full_softmax_gradient_is_autograds():
    """The written-out gradient against autograd through f M^T / T and cross-entropy (float64, logits up to 20 in
    size, a gradient scaled by 2.5 on its way back), and against finite differences (gradcheck)."""
    g = torch.Generator().manual_seed(3)
    bank = F.normalize(torch.randn(40, 8, generator=g, dtype=torch.float64), dim=1)
    own = torch.tensor([5, 39, 5, 0, 17, 22])
    f = F.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=1).requires_grad_()
    expected = F.cross_entropy(f @ bank.t() / 0.05, own)
    (expected_grad,) = torch.autograd.grad(2.5 * expected, f)
    loss = instance_softmax_loss(f, bank, own, 0.05)
    (grad,) = torch.autograd.grad(2.5 * loss, f)
    assert torch.allclose(loss, expected, rtol=0, atol=1e-12)
    assert torch.allclose(grad, expected_grad, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: instance_softmax_loss(x, bank, own, 0.05), (f,))


def test_full_softmax_is_stable_where_exp_overflows():
    """Bank rows and features close to one direction at T = 0.01 put every logit between 98 and 100, past
    float32's exp range (e^88.7): the float32 loss and gradient still match a float64 autograd reference."""
    g = torch.Generator().manual_seed(4)
    centre = torch.randn(16, generator=g)
    bank = F.normalize(centre + 0.1 * torch.randn(300, 16, generator=g), dim=1)
    own = torch.tensor([3, 150, 299, 3])
    f = F.normalize(centre + 0.1 * torch.randn(4, 16, generator=g), dim=1).requires_grad_()
    loss = instance_softmax_loss(f, bank, own, 0.01)
    (grad,) = torch.autograd.grad(loss, f)
    f64 = f.detach().double().requires_grad_()
    expected = F.cross_entropy(f64 @ bank.double().t() / 0.01, own)
    (expected_grad,) = torch.autograd.grad(expected, f64)
    assert (f.detach() @ bank.t() / 0.01).min() > 88.7
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert abs(loss.item() - expected.item()) < 1e-4 * max(1.0, expected.item())
    assert (grad.double() - expected_grad).abs().max() < 1e-4 * expected_grad.abs().max()


def test_full_softmax_ignores_autocast():
    """Under bf16 autocast the loss and gradient are the float32 ones, bit for bit (the bank's precision)."""
    g = torch.Generator().manual_seed(5)
    bank = F.normalize(torch.randn(50, 8, generator=g), dim=1)
    own = torch.tensor([1, 7, 49])
    f = F.normalize(torch.randn(3, 8, generator=g), dim=1).requires_grad_()
    loss = instance_softmax_loss(f, bank, own, 0.1)
    (grad,) = torch.autograd.grad(loss, f)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_loss = instance_softmax_loss(f, bank, own, 0.1)
    (autocast_grad,) = torch.autograd.grad(autocast_loss, f)
    assert autocast_loss.dtype == torch.float32
    assert torch.equal(autocast_loss, loss) and torch.equal(autocast_grad, grad)


def test_full_softmax_refuses_a_bank_with_a_gradient():
    bank = torch.randn(4, 2, requires_grad=True)
    with pytest.raises(ValueError, match="memory bank must not require a gradient"):
        instance_softmax_loss(torch.randn(2, 2), bank, torch.tensor([0, 1]), 0.1)


def test_nce_loss_matches_the_formula():
    g = torch.Generator().manual_seed(1)
    n_data, k, batch, t, z = 50, 6, 4, 0.1, 37.0
    similarities = torch.rand(batch, k + 1, generator=g) * 2 - 1
    scores = nce_scores(similarities, t, torch.tensor(z))
    naive, pn = 0.0, 1 / n_data
    for b in range(batch):
        p = [math.exp(similarities[b, j].item() / t) / z for j in range(k + 1)]
        naive += math.log(p[0] / (p[0] + k * pn + 1e-7))
        for j in range(1, k + 1):
            naive += math.log(k * pn / (p[j] + k * pn + 1e-7))
    assert abs(nce_loss(scores, n_data).item() - (-naive / batch)) < 1e-5


# ---- Z, the noise, the interface -------------------------------------------------------------------------------------

def test_z_is_estimated_once_on_the_first_batch_and_kept():
    method, train = build("--nce_k", "16", "--nce_t", "0.07")
    method.eval()  # batch norm on running statistics: the embedding below is the one the forward pass used
    first, second = batch_of(train, [0, 5, 9, 11]), batch_of(train, [1, 2, 3, 4])
    noise_state, bank = method.noise.get_state(), method.memory_bank.clone()
    assert method.nce_z.item() < 0
    crops = method.prepare(first)
    loss, _ = method(crops, first, Progress(0, 0, 0, 1))
    # Z by hand: the same draws, column 0 = own index, N * mean over all K + 1 columns of exp(v . f / T).
    noise = torch.randint(len(train), (4, 16), generator=torch.Generator().set_state(noise_state))
    columns = torch.cat([first.indices[:, None], noise], dim=1)
    f = method.embedding(crops[0]).detach()
    similarities = torch.stack([torch.stack([bank[c] @ f[b] for c in columns[b]]) for b in range(4)])
    z = len(train) * torch.exp(similarities / 0.07).mean()
    assert abs(method.nce_z.item() / z.item() - 1) < 1e-5
    torch.testing.assert_close(loss, nce_loss(nce_scores(similarities, 0.07, z), len(train)), rtol=1e-5, atol=1e-5)
    loss.backward()
    method.after_backward(Progress(0, 0, 0, 1))
    kept = method.nce_z.clone()
    for step in range(2):
        method(method.prepare(second), second, Progress(0, step + 1, step + 1, 3))[0].backward()
        method.after_backward(Progress(0, step + 1, step + 1, 3))
    assert torch.equal(method.nce_z, kept)
    # In the state dict (so in checkpoints): a fresh model with the loaded Z does not estimate it again.
    fresh, _ = build("--nce_k", "16", "--nce_t", "0.07")
    fresh.load_state_dict(method.state_dict())
    fresh.eval()
    fresh(fresh.prepare(second), second, Progress(0, 0, 0, 1))
    assert torch.equal(fresh.nce_z, kept)


def test_noise_generator_resumes_exactly():
    method, train = build("--nce_k", "16")
    method.eval()
    batch = batch_of(train, [7, 8, 9, 10])
    method(method.prepare(batch), batch, Progress(0, 0, 0, 1))  # Z estimated
    saved = method.random_state()
    a = method(method.prepare(batch), batch, Progress(0, 1, 1, 1))[0]
    b = method(method.prepare(batch), batch, Progress(0, 2, 2, 1))[0]
    method.load_random_state(saved)
    assert torch.equal(method(method.prepare(batch), batch, Progress(0, 1, 1, 1))[0], a)
    assert not torch.equal(a, b)


def test_defaults_follow_the_cifar_recipe():
    args = npid_args()
    expected = {"optimizer": "sgd", "lr": 0.03, "schedule": "step", "lr_drops": [120, 160], "lr_gamma": 0.1,
                "weight_decay": 5e-4, "momentum": 0.9, "nesterov": False, "epochs": 200, "batch_size": 128,
                "nmb_crops": [1], "min_scale_crops": [0.2], "max_scale_crops": [1.0], "brightness": 0.4,
                "contrast": 0.4, "saturation": 0.4, "hue": 0.4, "jitter_p": 1.0, "grey_p": 0.2, "flip_p": 0.0,
                "blur_p": 0.0, "nce_k": 0, "bank_t": 0.1, "bank_m": 0.5, "embed_dim": 128, "arch": "resnet18_cifar"}
    assert {k: getattr(args, k) for k in expected} == expected


def test_embedding_features_and_memory_bank():
    method, train = build("--nce_k", "0", "--low_dim", "16")
    method.eval()
    images = method.prepare(batch_of(train, [0, 1, 2]))[0]
    with torch.no_grad():
        embedding, features = method.embedding(images), method.features(images)
    assert embedding.shape == (3, 16) and torch.allclose(embedding.norm(dim=1), torch.ones(3))
    assert features.shape == (3, method.backbone.out_dim) == (3, 32)
    assert method.memory_bank.shape == (len(train), 16)
    assert method.memory_bank.data_ptr() == method.state_dict()["memory.weight"].data_ptr()


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "configs").glob("npid_*.yaml")))
def test_recipes_parse_and_build(recipe):
    args = main_pretrain.parse_args(["--config", str(ROOT / "configs" / recipe), "--width", "4", "--device", "cpu"])
    assert args.method == "npid"
    channels = 1 if args.dataset == "fashion_mnist" else 3
    info = DataInfo(channels, 32, 5000, 10, (0.5,) * channels, (0.25,) * channels)
    method = METHODS["npid"](args, info, torch.device("cpu"))
    assert method.memory_bank.shape == (5000, args.embed_dim)


@pytest.mark.parametrize("flags,word", [(["--nce_k", "64"], "--nce_k"), (["--nce_m", "1.0"], "--bank_m 1.0"),
                                        (["--nmb_crops", "2"], "--nmb_crops")])
def test_bad_flags_are_refused(flags, word):
    with pytest.raises(ConfigError, match=word):
        build(*flags)


# ---- one Trainer step on 2 processes = 1 process --------------------------------------------------------------------

RUNS = {"softmax": ["--nce_k", "0"], "nce": ["--nce_k", "8"]}
BATCH = 16


def npid_step(output_dir: Path, extra: list[str]) -> dict:
    args = npid_args(*extra, "--batch_size", str(BATCH), "--epochs", "1", "--lr", "0.1", "--output_dir",
                     str(output_dir), "--log_every", "100")
    ctx = distributed.init(args.device)
    engine.seed_everything(args.seed)
    train = images(BATCH)  # one global batch: one step
    method = METHODS["npid"](args, DataInfo.of(train), ctx.device)
    output_dir.mkdir(parents=True, exist_ok=True)
    trainer = engine.Trainer(method, args, ctx, output_dir, train)
    start = {k: v.detach().clone() for k, v in method.state_dict().items()}
    trainer.train_one_epoch(0)
    return {"start": start, "model": {k: v.detach().clone() for k, v in method.state_dict().items()},
            "noise": method.noise.get_state()}


def _npid_worker(rank, world, tmp):
    return {name: npid_step(Path(tmp) / f"{name}_w{world}", extra) for name, extra in RUNS.items()}


def test_trainer_step_on_two_processes_equals_one_process(tmp_path):
    two = run_distributed(_npid_worker, 2, str(tmp_path))
    for name, extra in RUNS.items():
        one = npid_step(tmp_path / f"{name}_w1", extra)
        for rank in range(2):
            got = two[rank][name]
            for key, value in one["model"].items():
                assert (got["model"][key].double() - value.double()).abs().max() < 1e-5, (name, key)
            assert torch.equal(got["noise"], one["noise"])  # all ranks drew the global batch's negatives
        # The step moved the weights and wrote every sample's bank row; NCE estimated Z.
        assert not torch.allclose(one["model"]["memory.weight"], one["start"]["memory.weight"])
        torch.testing.assert_close(one["model"]["memory.weight"].norm(dim=1), torch.ones(BATCH))
        assert (one["model"]["head.weight"] - one["start"]["head.weight"]).abs().max() > 1e-4
        assert (one["model"]["nce_z"] > 0) == (name == "nce")


def test_a_state_loaded_after_steps_brings_its_own_z():
    """NPID reads its Z buffer once, not at every step: loading weights whose Z is not estimated yet (-1) makes it
    estimate Z again instead of going on with -1 (a NaN loss)."""
    method, train = build("--nce_k", "16")
    method.eval()
    fresh = {k: v.clone() for k, v in method.state_dict().items()}
    batch = batch_of(train, [0, 5, 9, 11])
    assert torch.isfinite(method(method.prepare(batch), batch, Progress(0, 0, 0, 1))[0])
    assert method.nce_z.item() > 0
    method.load_state_dict(fresh)
    assert method.nce_z.item() < 0
    assert torch.isfinite(method(method.prepare(batch), batch, Progress(0, 0, 0, 1))[0])
    assert method.nce_z.item() > 0


def _generator_trainer(out: Path) -> engine.Trainer:
    args = npid_args("--batch_size", "16", "--epochs", "2", "--output_dir", str(out), "--log_every", "100")
    ctx = distributed.init(args.device)
    train = images(16)
    out.mkdir(parents=True, exist_ok=True)
    return engine.Trainer(METHODS["npid"](args, DataInfo.of(train), ctx.device), args, ctx, out, train)


def _generators_worker(rank, world, run_dir):
    trainer = _generator_trainer(Path(run_dir))
    trainer.train_one_epoch(0)
    torch.rand(rank + 1)  # the ranks' global generators part ways (dropout over shares of uneven size)
    trainer.save(1, 0)
    saved_draws = torch.rand(4)
    torch.rand(50)
    _generator_trainer(Path(run_dir)).resume()
    return {"saved": saved_draws, "resumed": torch.rand(4)}


def test_a_resume_on_as_many_processes_gives_each_rank_its_own_generator(tmp_path):
    """The checkpoint keeps every rank's torch generator: resumed on 2 processes each rank draws on as it would
    have; on 1 process rank 0's (the only choice: which rank's share the one process stands for is not defined)."""
    two = run_distributed(_generators_worker, 2, str(tmp_path / "run"))
    for rank in two:
        assert torch.equal(rank["resumed"], rank["saved"])
    assert not torch.equal(two[0]["saved"], two[1]["saved"])
    _generator_trainer(tmp_path / "run").resume()
    assert torch.equal(torch.rand(4), two[0]["saved"])
