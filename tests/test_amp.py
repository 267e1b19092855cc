"""Mixed precision on the CPU: the autocast / GradScaler path a GPU run takes, executed by the tests.

For each of the nine methods, a few training steps under `--amp bf16` and `--amp fp16` (autocast on the CPU; fp16
with torch's CPU GradScaler): the loss stays finite, every parameter and every piece of state that must stay
float32 does (weights, Sinkhorn inputs via the queue, memory banks, prototypes), and for fp16 the scaler's state
is in the checkpoint. A run stopped in the middle of an epoch and resumed from its checkpoint ends bit-identical to
an uninterrupted one, scaler included. fp16 rides out a step whose gradients are not finite (skipped, the scale
halved) but stops a run whose gradients stay non-finite. `--amp auto` is float32 on the CPU, bf16 only on CUDA cards
that compute in it (fp16 on older ones), and config.yaml records what ran.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode

from clusterlab import checkpoint, distributed, engine, rundir
from clusterlab.data import ImageSet
from clusterlab.data import loader as data_loader
from clusterlab.methods import METHODS, Batch, DataInfo, Progress
from clusterlab.programs.train import parse_args
from conftest import TINY, assert_ok, run_script
from dist_utils import run_distributed
from test_resume import assert_same_tensors

SMALL = ["--dataset", "digits", "--width", "4", "--device", "cpu", "--batch_size", "16", "--size_crops", "8",
         "--epochs", "1", "--log_every", "100", "--sync_bn", "false"]
FLAGS = {
    "swav": ["--hidden_mlp", "32", "--feat_dim", "16", "--nmb_prototypes", "10", "--queue_length", "32",
             "--epoch_queue_starts", "0", "--freeze_prototypes_niters", "1", "--warmup_epochs", "0", "--lr", "0.3"],
    "unmix": ["--hidden_mlp", "32", "--feat_dim", "16", "--nmb_prototypes", "10", "--queue_length", "32",
              "--epoch_queue_starts", "0", "--freeze_prototypes_niters", "1", "--warmup_epochs", "0", "--lr", "0.3"],
    "npid": ["--low_dim", "16", "--nce_k", "8"],
    "superand": ["--low_dim", "16", "--rounds", "1", "--epochs_per_round", "1", "--schedule_period", "1"],
    "sela": ["--hc", "2", "--ncl", "5", "--nopts", "3", "--label_batch_size", "32"],
    "selfclassifier": ["--dim", "16", "--hidden_dim", "32", "--cls_size", "5", "--queue_len", "32"],
    "embedul": ["--low_dim", "16", "--num_heads", "2"],
    "scan": ["--num_heads", "2", "--num_neighbours", "5", "--cutout", "4"],
    "scan_selflabel": ["--ema", "true", "--confidence_threshold", "0.1", "--cutout", "4"],
}


def images(n: int = 64) -> ImageSet:
    g = torch.Generator().manual_seed(0)
    return ImageSet("fake", "train", torch.arange(n) % 10, 10, 1, 8, (0.5,), (0.25,), [str(c) for c in range(10)],
                    images=torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8))


def trainer_for(method_name: str, amp: str, run_dir, *flags: str) -> engine.Trainer:
    kind = METHODS[method_name].program_kind
    args = parse_args(kind, ["--method", method_name, *SMALL, *FLAGS[method_name], "--amp", amp, *flags,
                             "--output_dir", str(run_dir)])
    ctx = distributed.init("cpu")
    engine.seed_everything(args.seed)
    train = images()
    method = METHODS[method_name](args, DataInfo.of(train), ctx.device)
    run_dir.mkdir(parents=True, exist_ok=True)
    return engine.Trainer(method, args, ctx, run_dir, train, kind=kind)


def float_tensors(tree, where=""):
    """(where, tensor) of every floating-point tensor in a nested state."""
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point():
            yield where, tree
    elif isinstance(tree, dict):
        for key, value in tree.items():
            yield from float_tensors(value, f"{where}/{key}")
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from float_tensors(value, f"{where}[{i}]")


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("method_name", sorted(FLAGS))
def test_steps_under_autocast_are_finite_keep_float32_state_and_resume_exactly(tmp_path, stop_after, method_name,
                                                                                 amp):
    torch.set_num_threads(1)
    reference = trainer_for(method_name, amp, tmp_path / "reference")
    assert reference.precision == amp
    assert reference.scaler.is_enabled() == (amp == "fp16")
    computed_in = set()  # the dtypes the backbone's convolutions and linear layers computed in
    for module in reference.method.backbone.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            module.register_forward_hook(lambda module, inputs, output: computed_in.add(output.dtype))
    assert reference.train_one_epoch(0)
    # the steps ran under autocast (a step without it passed every other check here, in float32)
    assert {"bf16": torch.bfloat16, "fp16": torch.float16}[amp] in computed_in, computed_in
    final = reference.state_dict(1, 0)
    assert all(torch.isfinite(t).all() for _, t in float_tensors(final["model"])), "non-finite weights"
    # Weights, prototypes, queues, memory banks, pseudo-labels: autocast computes in low precision, keeps nothing so.
    low = [where for where, t in float_tensors({"model": final["model"], "state": final["method_state"]})
           if t.dtype in (torch.float16, torch.bfloat16)]
    assert not low, low
    if amp == "fp16":
        assert final["scaler"]["scale"] > 0 and "_growth_tracker" in final["scaler"]
    # fp16 on the CPU ran many times slower than float32 without a word
    fp16_note = [note for note in reference.start_notes() if note.startswith("--amp fp16 on the CPU")]
    assert len(fp16_note) == (amp == "fp16") and all("use --amp bf16 or off there" in note for note in fp16_note)

    stopped = trainer_for(method_name, amp, tmp_path / "stopped")
    stop_after(stopped, 2)
    assert not stopped.train_one_epoch(0) and stopped.position == (0, 2)
    stopped.save(*stopped.position)
    stop_after(None)
    resumed = trainer_for(method_name, amp, tmp_path / "stopped")
    assert resumed.resume() == (0, 2)
    assert resumed.train_one_epoch(0, start_step=2)
    ours = resumed.state_dict(1, 0)
    for key in ("model", "optimizer", "scaler", "method_state", "method_random", "global_step"):
        assert_same_tensors(ours[key], final[key], key)


@pytest.mark.parametrize("before,after", [("bf16", "fp16"), ("off", "fp16"), ("fp16", "bf16")])
def test_resume_may_change_the_precision(tmp_path, before, after):
    """--amp is not among the settings a resume must keep: a run trained without fp16 has no scaler state, and
    resuming it with fp16 starts a fresh scaler (not "does not fit this command's model")."""
    torch.set_num_threads(1)
    first = trainer_for("swav", before, tmp_path)
    assert first.train_one_epoch(0)
    first.save(1, 0)
    resumed = trainer_for("swav", after, tmp_path)
    assert resumed.resume() == (1, 0) and resumed.global_step == first.global_step
    fresh = torch.amp.GradScaler("cpu", enabled=after == "fp16").state_dict()
    assert resumed.scaler.state_dict() == fresh
    assert_same_tensors(resumed.method.state_dict(), first.method.state_dict(), "model")
    ran = {"off": "float32"}
    assert resumed.resume_changes == [{"epoch": 1, "step": 0, "before": {"amp": ran.get(before, before)},
                                       "after": {"amp": after}}]
    assert resumed.resume_notes == [f"the precision changed on resume ({ran.get(before, before)} -> {after}): "
                                    f"config.yaml and the tables record the change"]


def test_auto_is_float32_on_the_cpu_and_config_records_what_ran(tmp_path):
    for amp, ran in (("auto", "float32"), ("bf16", "bf16")):
        run = tmp_path / amp
        assert_ok(run_script("main_pretrain.py", *TINY, "--epochs", 1, "--amp", amp, "--output_dir", run))
        assert yaml.safe_load((run / "config.yaml").read_text())["precision"] == ran
        if amp == "bf16":
            assert checkpoint.load(run / "checkpoint.pth")["args"]["amp"] == "bf16"


def poison_gradients(trainer: engine.Trainer, calls: set | None) -> None:
    """The first parameter's gradient is NaN at the backward passes numbered `calls` (from 1; every one when None)."""
    count = []

    def hook(grad):
        count.append(1)
        return torch.full_like(grad, float("nan")) if calls is None or len(count) in calls else grad

    next(trainer.method.parameters()).register_hook(hook)


def test_fp16_skips_a_step_whose_gradients_are_not_finite_and_trains_on(tmp_path):
    """The 6th step's gradients are NaN: that step is skipped, which halves the scale where the same run without them
    keeps it (NPID's own fp16 overflows skip some of the first steps in both), and training goes on."""
    torch.set_num_threads(1)
    scales = {}
    for name, poisoned in (("twin", set()), ("poisoned", {6})):
        trainer = trainer_for("npid", "fp16", tmp_path / name)
        trainer.args.log_every = 1
        poison_gradients(trainer, poisoned)
        first = next(trainer.method.parameters()).detach().clone()
        for epoch in range(3):
            assert trainer.train_one_epoch(epoch)
        assert not torch.equal(first, next(trainer.method.parameters()))
        scales[name] = [r["loss_scale"] for r in rundir.read_jsonl(tmp_path / name / "train_log.jsonl")
                        if "loss_scale" in r]
    assert scales["twin"][:6] == scales["poisoned"][:5] + [scales["poisoned"][4]], "the twin skips no 6th step"
    assert scales["poisoned"][5] == scales["twin"][5] / 2
    assert trainer.skipped_in_a_row == 0


def test_fp16_gradients_never_finite_stop_the_run_instead_of_skipping_every_step(tmp_path):
    """With NaN gradients at every step the scaler would skip them all and halve its scale to 0 while the run went
    on (the weights frozen, the checkpoints saved as good); after 32 steps in a row the run stops with one line,
    and the train log shows the scale going down (4 steps per epoch, records at each epoch's first and last steps)."""
    torch.set_num_threads(1)
    trainer = trainer_for("npid", "fp16", tmp_path)
    poison_gradients(trainer, None)
    before = [p.detach().clone() for p in trainer.method.parameters()]
    with pytest.raises(engine.NonFiniteLoss, match=r"fp16: the gradients were not finite at 32 steps in a row, up to "
                                                   r"epoch 8 step 4/4 .*halved to 1\.52588e-05.*no longer train"):
        for epoch in range(10):
            trainer.train_one_epoch(epoch)
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.method.parameters()))
    scales = [r["loss_scale"] for r in rundir.read_jsonl(tmp_path / "train_log.jsonl") if "loss_scale" in r]
    done_when_logged = sorted({*range(1, 30, 4), *range(4, 29, 4)})
    assert scales == [2.0 ** (16 - done) for done in done_when_logged]


def skipped_for_two_epochs(run_dir) -> engine.Trainer:
    """An NPID fp16 run whose gradients are never finite: 2 epochs of 4 steps, every one skipped, saved at epoch 2."""
    torch.set_num_threads(1)
    trainer = trainer_for("npid", "fp16", run_dir)
    poison_gradients(trainer, None)
    for epoch in range(2):
        trainer.train_one_epoch(epoch)
    trainer.save(2, 0)
    return trainer


@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_a_forward_pass_past_fp16s_range_stops_with_a_message_that_names_it(tmp_path, amp):
    """The scaler rides out gradients that overflow, not a forward pass that does: the loss is not finite at once,
    and under fp16 the message blamed the loss alone (a run whose features pass 65504 trains on in float32 and bf16).
    Here the features are made infinite, in either precision."""
    trainer = trainer_for("swav", amp, tmp_path / "run")
    trainer.method.backbone.register_forward_hook(lambda module, inputs, output: output * float("inf"))
    with pytest.raises(engine.NonFiniteLoss) as stopped:
        trainer.train_one_epoch(0)
    assert str(stopped.value).startswith("loss is not finite at epoch 1 step 1/")
    named = "(or the forward pass overflowed fp16's range, up to 65504, where float32 would not: try --amp bf16 or off)"
    assert (named in str(stopped.value)) == (amp == "fp16"), str(stopped.value)


def test_fp16_steps_skipped_before_a_resume_count_towards_the_stop(tmp_path):
    """Saved after 8 skipped steps and resumed, the run stops where the run never stopped does (32 in a row, epoch 8
    step 4/4): the count restarted at 0, so a run requeued often enough skipped steps for ever."""
    skipped_for_two_epochs(tmp_path)
    resumed = trainer_for("npid", "fp16", tmp_path)
    assert resumed.resume() == (2, 0) and resumed.skipped_in_a_row == 8
    poison_gradients(resumed, None)
    with pytest.raises(engine.NonFiniteLoss, match=r"at 32 steps in a row, up to epoch 8 step 4/4 "):
        for epoch in range(2, 10):
            resumed.train_one_epoch(epoch)


def test_sela_heads_run_in_float32_under_autocast(tmp_path):
    method = trainer_for("sela", "bf16", tmp_path / "run").method
    images = torch.randn(4, 1, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = method.backbone(images)
        logits = method.head_logits(images)
    assert features.dtype == torch.bfloat16
    for head, ours in zip(method.heads, logits):
        assert ours.dtype == torch.float32 and torch.equal(ours, head(features.float()))


@pytest.mark.parametrize("method_name", ["swav", "unmix", "selfclassifier"])
def test_what_follows_the_backbone_runs_in_float32_under_autocast(tmp_path, monkeypatch, method_name):
    """Only the backbone runs in bf16: the projection, the prototype scores the Sinkhorn exponentiates at
    epsilon 0.05, Self-Classifier's logits divided by 0.05 to 0.1 and its queue's neighbour search are the float32
    values of the same backbone features (bf16 there moved SwAV's codes by up to 3 % and gave 4 % of the queue's
    neighbours wrongly)."""
    from clusterlab.ops.knn import topk_neighbours

    method = trainer_for(method_name, "bf16", tmp_path / "run").method
    features = torch.randn(32, method.backbone.out_dim).bfloat16()  # as the backbone gives them under autocast
    module = "clusterlab.methods." + ("selfclassifier" if method_name == "selfclassifier" else "swav")
    monkeypatch.setattr(module + ".backbone_features", lambda backbone, crops: features.to(crops[0].dtype))
    crops = [torch.zeros(16, 1, 8, 8)] * 2

    def tail():
        if method_name == "selfclassifier":
            z = torch.cat(method.embed(crops))
            return z, torch.cat([head(z) for head in method.heads], dim=1)
        return method.embed(crops)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = tail()
        neighbours = topk_neighbours(mixed[0][:8], mixed[0], 3)
    exact = tail()
    reference_neighbours = topk_neighbours(exact[0][:8], exact[0], 3)
    for ours, reference in zip((*mixed, neighbours.similarities), (*exact, reference_neighbours.similarities)):
        assert ours.dtype == torch.float32 and torch.equal(ours, reference)


def test_swav_queue_scores_are_float32_under_autocast():
    from clusterlab.ops.queue import EmbeddingQueue

    queue = EmbeddingQueue(1, 32, 16, 16, 1, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    queue.push(0, torch.nn.functional.normalize(torch.randn(16, 16, generator=g), dim=1))
    prototypes = torch.nn.functional.normalize(torch.randn(10, 16, generator=g), dim=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = queue.scores(0, prototypes)
    assert mixed.dtype == torch.float32 and torch.equal(mixed, queue.scores(0, prototypes))


@pytest.mark.parametrize("capability, expected", [((6, 0), torch.float16), ((7, 0), torch.float16),
                                                  ((7, 5), torch.float16), ((8, 0), torch.bfloat16),
                                                  ((9, 0), torch.bfloat16)])
def test_auto_precision_is_bf16_only_on_cards_with_bf16_arithmetic(capability, expected):
    # V100 (7.0) and T4 (7.5) emulate bf16 without tensor cores: fp16 with the scaler there, as upstream SwAV ran.
    assert engine.resolve_precision("auto", torch.device("cuda"), capability) == expected
    assert engine.resolve_precision("auto", torch.device("cpu"), capability) is None
    assert engine.resolve_precision("bf16", torch.device("cuda"), capability) == torch.bfloat16


def test_skipped_steps_do_not_carry_over_a_resume_that_changes_the_precision(tmp_path):
    """8 skipped fp16 steps, then a clean bf16 epoch (no scaler: nothing can be skipped), then fp16 again with a fresh
    scaler: the 8 old skips belong to another scaler and to steps before a clean epoch, so the resumed fp16 run must
    skip 32 steps in a row (8 epochs of 4 steps) before it stops, not 24."""
    assert skipped_for_two_epochs(tmp_path).skipped_in_a_row == 8
    clean = trainer_for("npid", "bf16", tmp_path)
    assert clean.resume() == (2, 0)
    assert clean.train_one_epoch(2)
    clean.save(3, 0)
    assert clean.state_dict(3, 0)["skipped_in_a_row"] == 0, "a bf16 checkpoint records fp16 skips"
    again = trainer_for("npid", "fp16", tmp_path)
    assert again.resume() == (3, 0)
    poison_gradients(again, None)
    with pytest.raises(engine.NonFiniteLoss, match=r"at 32 steps in a row, up to epoch 11 step 4/4 "):
        for epoch in range(3, 20):
            again.train_one_epoch(epoch)


def test_a_resume_without_fp16_starts_no_stale_count(tmp_path):
    """fp16 -> bf16: the resumed run has no scaler, so it has skipped nothing."""
    torch.set_num_threads(1)
    first = trainer_for("npid", "fp16", tmp_path)
    poison_gradients(first, None)
    first.train_one_epoch(0)
    first.save(1, 0)
    bf16 = trainer_for("npid", "bf16", tmp_path)
    bf16.resume()
    assert bf16.skipped_in_a_row == 0


class DeviceReads(TorchDispatchMode):
    """Counts the reads of a tensor's value back to the host (.item(), float(), .tolist(): each a wait for a GPU)."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.reads += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def reads_in_a_step(run_dir, amp: str) -> int:
    """The values read back in one training step and its check, after the first step (which reads the scaler's
    initial scale)."""
    trainer = trainer_for("swav", amp, run_dir)
    trainer.train_one_epoch(0)
    batches = data_loader.iterate(trainer.train_set, trainer.batches, 1, augment=trainer.method.augment,
                                  device=trainer.ctx.device)
    step, images, labels, indices, total, offset = next(iter(batches))
    with DeviceReads() as counted:
        trainer.check(*trainer.step(Batch(images, labels, indices, total, offset),
                                    Progress(1, step, trainer.global_step, trainer.steps_per_epoch)))
    assert (trainer.loss_scale is not None) == (amp == "fp16")
    return counted.reads


def test_an_fp16_step_waits_for_the_device_only_where_the_scaler_must(tmp_path):
    """fp16 read the scaler's scale after every step (get_scale, a wait for the device of its own, before the
    step's check waits anyway); it now comes back with the check's values. What is left is the scaler's own test of
    the gradients inside scaler.step (the augmentation's reads of host tensors are the same in both runs)."""
    torch.set_num_threads(1)
    assert reads_in_a_step(tmp_path / "fp16", "fp16") - reads_in_a_step(tmp_path / "off", "off") == 1


def _scales_of_an_fp16_epoch(rank, world, run_dir, poisoned_rank):
    """The scale after each step of a SwAV fp16 epoch whose 3rd backward pass is NaN on `poisoned_rank` only."""
    trainer = trainer_for("swav", "fp16", Path(run_dir))
    # a scale small enough that no step overflows on its own (from 2**16 the first steps all do, halving it)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 6)
    poison_gradients(trainer, {3} if rank == poisoned_rank else set())
    scales, note = [], trainer.note_scale
    trainer.note_scale = lambda scale: (scales.append(scale), note(scale))
    trainer.train_one_epoch(0)
    return {"scales": scales, "skipped_in_a_row": trainer.skipped_in_a_row}


def test_fp16_skips_and_scales_agree_on_every_rank(tmp_path):
    """NaN gradients on one rank reach every rank (DDP averages them), so every rank skips that step and halves its
    scale; the scale each rank reads back with the step's check (a mean over the ranks) is the one it keeps."""
    ranks = run_distributed(_scales_of_an_fp16_epoch, 2, str(tmp_path / "run"), 1)
    # 64 images in global batches of 16: the 3rd step is skipped, and the scale halves on both ranks
    assert ranks == [{"scales": [64.0, 64.0, 32.0, 32.0], "skipped_in_a_row": 0}] * 2


def test_a_cuda_device_runs_float32_convolutions_in_float32(monkeypatch):
    """cuDNN's TF32 convolutions (PyTorch's default, used from Ampere on) would round float32 inputs to 10 mantissa
    bits in runs that record `precision: float32`; the fastest algorithm per shape is still chosen."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    distributed.configure_cudnn()
    assert torch.backends.cudnn.allow_tf32 is False and torch.backends.cudnn.benchmark is True
