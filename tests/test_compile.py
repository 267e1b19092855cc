"""`--compile` (torch.compile of the backbone) on the CPU, with SwAV on digits.

A run trained one epoch without --compile is continued for a second epoch twice from a copy of its checkpoint: once
eagerly and once with --compile. The compiled run must load the eager checkpoint (the state-dict keys do not change),
and its per-step losses must equal the eager ones up to the rounding differences of fused kernels. Where no C++
compiler works, --compile is refused with one line before anything trains.
"""
from __future__ import annotations

import shutil
import subprocess

import pytest
import torch
import yaml

from clusterlab.errors import ConfigError
from conftest import (ONE_EPOCH, PYTHON, ROOT, TWO_EPOCHS, assert_ok, assert_user_error, copy_run, run_script,
                      script_env, step_losses)
from test_amp import trainer_for

# Per-step losses of the compiled second epoch against the eager one. Both start from the same weights, so the first
# steps differ only by the rounding of fused kernels (measured: below 4e-6 relative over the first 7 steps with
# AVX-512 kernels, up to 9e-4 by step 2 with AVX2 ones, ATEN_CPU_CAPABILITY=avx2); LARS at lr 4.8 then amplifies the
# differences (measured: up to 4e-3 by step 14), still far below the loss's own changes.
FIRST_STEPS, FIRST_RTOL, EPOCH_RTOL = 5, 5e-3, 2e-2


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on the CPU (inductor) needs a C++ compiler")
def test_compiled_run_resumes_an_eager_checkpoint_and_matches_eager_losses(tmp_path):
    eager = tmp_path / "eager"
    assert_ok(run_script("main_pretrain.py", *ONE_EPOCH, "--output_dir", eager))
    compiled = copy_run(eager, tmp_path / "compiled")
    assert_ok(run_script("main_pretrain.py", *TWO_EPOCHS, "--output_dir", eager))
    result = run_script("main_pretrain.py", *TWO_EPOCHS, "--compile", "--output_dir", compiled, timeout=900)
    assert_ok(result)
    assert "from the end of epoch 1 " in result.stdout

    theirs, ours = step_losses(eager, 1), step_losses(compiled, 1)
    assert len(ours) == len(theirs) == 898 // 64
    ours, theirs = torch.tensor(ours), torch.tensor(theirs)
    assert torch.allclose(ours[:FIRST_STEPS], theirs[:FIRST_STEPS], rtol=FIRST_RTOL, atol=0), (ours, theirs)
    assert torch.allclose(ours, theirs, rtol=EPOCH_RTOL, atol=0), (ours, theirs)
    assert theirs.max() - theirs.min() > 5 * EPOCH_RTOL * theirs.max()  # the loss moves more than the tolerance
    recorded = yaml.safe_load((compiled / "config.yaml").read_text())
    assert recorded["args"]["compile"] is True
    # Saved with --compile, read without it: the same keys and shapes as the eager run's checkpoint.
    mine = torch.load(compiled / "checkpoint.pth", weights_only=True)["model"]
    reference = torch.load(eager / "checkpoint.pth", weights_only=True)["model"]
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in reference.items()}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on the CPU (inductor) needs a C++ compiler")
def test_a_compile_run_compiles_its_backbone_in_place(tmp_path):
    """The run above passes as well with nothing compiled (the eager losses are within its tolerances of
    themselves): a trainer of --compile has its backbone's forward compiled, in place, the state dict's keys those
    of the eager model."""
    eager, compiled = (trainer_for("swav", "off", tmp_path / name, *flags)
                       for name, flags in (("eager", ()), ("compiled", ("--compile",))))
    assert eager.method.backbone._compiled_call_impl is None
    assert compiled.method.backbone._compiled_call_impl is not None
    assert list(compiled.method.state_dict()) == list(eager.method.state_dict())


def test_compile_is_refused_in_one_line_where_no_compiler_works(tmp_path):
    # A cache of its own, so that no kernel compiled earlier spares the compiler; a compiler that does not exist.
    env = {**script_env(), "CXX": str(tmp_path / "no-such-compiler"),
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    run_dir = tmp_path / "run"
    result = subprocess.run([PYTHON, str(ROOT / "main_pretrain.py"), *ONE_EPOCH, "--compile", "--output_dir",
                             str(run_dir)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert_user_error(result, "main_pretrain.py", "--compile", "does not work on cpu", "no-such-compiler",
                      "run without --compile")
    assert not run_dir.exists()


def test_one_value_per_channel_under_dynamo_is_a_config_error(tmp_path, monkeypatch):
    """What a compiled backbone raises for it (torch 2.14): Dynamo's TorchRuntimeError, a RuntimeError whose text
    holds batch norm's message. Eager raises a ValueError, which the engine names; this must be named too."""
    from torch._dynamo.exc import TorchRuntimeError

    trainer = trainer_for("npid", "off", tmp_path)

    def fails(images):
        raise TorchRuntimeError("RuntimeError when making fake tensor call\n  Explanation: Dynamo failed to run FX "
                                "node with fake tensors: call_function <function batch_norm>: got ValueError("
                                "'Expected more than 1 value per channel when training, got input size "
                                "torch.Size([1, 32, 1, 1])')")

    monkeypatch.setattr(trainer.method.backbone, "forward", fails)
    with pytest.raises(ConfigError, match="one value per channel"):
        trainer.train_one_epoch(0)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler")
def test_one_value_per_channel_with_a_really_compiled_backbone(tmp_path):
    torch.set_num_threads(1)
    trainer = trainer_for("npid", "off", tmp_path)
    trainer.method.backbone.compile()
    trainer.batches = type(trainer.batches)(len(trainer.train_set), 1, 1, 0, trainer.args.seed)
    trainer.args.batch_size = 1
    with pytest.raises(ConfigError, match="one value per channel"):
        trainer.train_one_epoch(0)
