"""Checkpoints (checkpoint.py): written atomically, loaded with weights_only=True, refused with one line when they are
truncated, random, foreign, of another method or kind, or hold a pickled object; the RNG states round-trip."""
from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from clusterlab import checkpoint
from clusterlab.errors import CheckpointError
from clusterlab.eval.features import load_run
from conftest import assert_ok, assert_user_error, copy_run, run_script

STATE = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "epoch": 3, "step": 0, "names": ["a", "b"]}


def saved(tmp_path, name="checkpoint.pth", state=STATE, kind="pretrain", method="swav"):
    path = tmp_path / name
    checkpoint.save(state, path, kind=kind, method=method)
    return path


def test_save_and_load_round_trip_with_tags(tmp_path):
    path = saved(tmp_path)
    loaded = checkpoint.load(path, kind="pretrain", method="swav")
    tags = (loaded["format"], loaded["schema"], loaded["kind"], loaded["method"])
    assert tags == ("clusterlab", 1, "pretrain", "swav")
    assert torch.equal(loaded["model"]["w"], STATE["model"]["w"]) and loaded["names"] == ["a", "b"]
    assert checkpoint.load(path, kind=("cluster", "pretrain"))["epoch"] == 3
    assert os.listdir(tmp_path) == ["checkpoint.pth"]


@pytest.mark.parametrize("failure", [OSError("No space left on device"), KeyboardInterrupt()])
def test_failed_write_keeps_the_previous_file_and_no_temp_file(tmp_path, monkeypatch, failure):
    path = saved(tmp_path)
    before = path.read_bytes()

    def torch_save_that_dies(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a checkpoint")  # something reached the disk before the failure
        raise failure

    monkeypatch.setattr(torch, "save", torch_save_that_dies)
    with pytest.raises(type(failure)):
        checkpoint.save({**STATE, "epoch": 4}, path, kind="pretrain", method="swav")
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["checkpoint.pth"]
    monkeypatch.undo()
    assert checkpoint.load(path)["epoch"] == 3


def test_text_is_written_atomically_too(tmp_path, monkeypatch):
    target = tmp_path / "status.json"
    checkpoint.atomic_write_text(target, "old\n")
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("rename failed")))
    with pytest.raises(OSError):
        checkpoint.atomic_write_text(target, "new\n")
    assert target.read_text() == "old\n" and os.listdir(tmp_path) == ["status.json"]


def assert_refused(path, *words, **load_kwargs) -> str:
    with pytest.raises(CheckpointError) as caught:
        checkpoint.load(path, **load_kwargs)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message, message
    for word in words:
        assert word in message, message
    return message


def test_truncated_file_is_refused(tmp_path):
    path = saved(tmp_path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert_refused(path, "corrupt or not a torch file")


def test_bytes_changed_in_place_are_refused_by_the_archives_checksums(tmp_path):
    """torch.load does not check the CRC-32 its zip archive keeps of every entry: a weight's bytes changed on disk
    loaded as another weight, and training and evaluations went on from it without a word."""
    weights = torch.linspace(-1, 1, 64)
    path = saved(tmp_path, state={**STATE, "model": {"w": weights}})
    content = bytearray(path.read_bytes())
    at = bytes(content).index(weights.numpy().tobytes())
    content[at + 8: at + 12] = bytes(byte ^ 0xFF for byte in content[at + 8: at + 12])
    path.write_bytes(bytes(content))
    assert not torch.equal(torch.load(path, weights_only=True)["model"]["w"], weights)  # torch alone takes it
    message = assert_refused(path, "is corrupt: the bytes of its entry ", "fail the checksum the file keeps")
    assert "epoch checkpoint" not in message  # (none beside it)
    assert checkpoint.load(path, mmap=True)["epoch"] == 3  # a peek at a few fields reads no weights
    # a byte of the format tag changed is a damaged file too, not a foreign one ("no format tag")
    path = saved(tmp_path)
    content = bytearray(path.read_bytes())
    content[bytes(content).index(b"clusterlab")] ^= 0x01
    path.write_bytes(bytes(content))
    assert_refused(path, "is corrupt: the bytes of its entry ")


@pytest.mark.parametrize("damage", ["truncated", "changed"])
def test_an_unreadable_checkpoint_names_the_latest_epoch_checkpoint_to_go_on_from(tmp_path, damage):
    for epoch in (1, 2):
        saved(tmp_path, name=f"checkpoint_ep{epoch:04d}.pth")
    path = saved(tmp_path)
    content = bytearray(path.read_bytes())
    if damage == "truncated":
        del content[len(content) // 2:]
    else:
        at = bytes(content).index(STATE["model"]["w"].numpy().tobytes())
        content[at] ^= 0xFF
    path.write_bytes(bytes(content))
    assert_refused(path, "; checkpoint_ep0002.pth beside it is the run's latest epoch checkpoint: copy it over "
                         "checkpoint.pth to go on from there")


@pytest.mark.parametrize("content", [os.urandom(4096), b"", b"\x80\x02}q\x00.", b"not a checkpoint at all\n"])
def test_random_or_empty_bytes_are_refused(tmp_path, content):
    path = tmp_path / "checkpoint.pth"
    path.write_bytes(content)
    assert_refused(path, "corrupt or not a torch file")


@pytest.mark.parametrize("foreign", [{"a": 1}, {"state_dict": {"w": torch.zeros(2)}}, [1, 2], torch.zeros(3)])
def test_foreign_torch_file_is_refused(tmp_path, foreign):
    path = tmp_path / "checkpoint.pth"
    torch.save(foreign, path)
    assert_refused(path, "not a clusterlab checkpoint")


def test_other_method_is_refused(tmp_path):
    path = saved(tmp_path, method="sela")
    assert_refused(path, "method 'sela'", "not 'swav'", "--output_dir", method="swav")


def test_other_kind_is_refused(tmp_path):
    path = saved(tmp_path, kind="linear")
    assert_refused(path, "a 'linear' checkpoint", "expected pretrain", kind="pretrain")
    assert_refused(path, "expected pretrain or cluster", kind=("pretrain", "cluster"))


def test_other_schema_is_refused(tmp_path):
    path = tmp_path / "checkpoint.pth"
    torch.save({"format": "clusterlab", "schema": 99, "kind": "pretrain", "method": "swav"}, path)
    assert_refused(path, "schema 99", "reads schema 1")


class RunsCode:
    """Unpickling this calls a function: what weights_only loading exists to prevent."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_object_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "checkpoint.pth"
    torch.save({"format": "clusterlab", "schema": 1, "kind": "pretrain", "method": "swav", "x": RunsCode(marker)},
               path)
    message = assert_refused(path, "weights_only refused it", "GLOBAL io.open")
    assert not marker.exists()
    assert len(message) < 400


def test_a_file_torch_cannot_map_is_refused_for_what_it_holds(tmp_path):
    """mmap loading refuses any file outside torch's zip format with advice to save it again; the reason given is the
    one a plain load finds (here: a pickle of code), and nothing runs."""
    import pickle

    marker, path = tmp_path / "code_ran", tmp_path / "checkpoint.pth"
    path.write_bytes(pickle.dumps(RunsCode(marker), protocol=2))
    message = assert_refused(path, "weights_only refused it", mmap=True)
    assert "mmap" not in message and not marker.exists()


def test_a_plain_pickle_is_refused_on_one_line_without_torchs_warning(tmp_path):
    """torch warned (two lines on stderr, before the one-line refusal) about the pickle protocol."""
    import pickle
    import warnings

    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"w": [1]}, protocol=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_refused(path, "weights_only refused it")
    assert [str(w.message) for w in caught] == []


def test_load_uses_weights_only(tmp_path, monkeypatch):
    path = saved(tmp_path)
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw) or real_load(*a, **kw))
    checkpoint.load(path)
    assert calls and all(kw.get("weights_only") is True for kw in calls)


def test_missing_file_is_refused(tmp_path):
    assert_refused(tmp_path / "nope.pth", f"does not exist; {str(tmp_path)!r} has no checkpoint file")
    (tmp_path / "config.yaml").write_text("")  # a run's folder
    assert_refused(tmp_path / "nope.pth", f"does not exist; {str(tmp_path)!r} has no checkpoint yet")
    assert_refused(tmp_path / "gone" / "nope.pth", "nope.pth' does not exist")
    assert_refused(tmp_path, "is a directory, not a checkpoint file")


def test_a_missing_file_names_the_last_checkpoints_beside_it(tmp_path):
    """Whoever asked for it (an evaluation, --pretrained, a resume) is told the folder's last four by name (the
    latest epochs): the likeliest meant."""
    for epoch in range(3, 10):
        (tmp_path / f"checkpoint_ep{epoch:04d}.pth").write_bytes(b"")
    (tmp_path / "checkpoint.pth").write_bytes(b"")
    assert_refused(tmp_path / "checkpoint_ep0099.pth", "has 4 more, then checkpoint_ep0006.pth, checkpoint_ep0007.pth, "
                                                       "checkpoint_ep0008.pth, checkpoint_ep0009.pth")
    # a link to nowhere is named as one, not listed as there beside a claim that it does not exist
    (tmp_path / "checkpoint.pth").unlink()
    (tmp_path / "checkpoint.pth").symlink_to(tmp_path / "purged" / "checkpoint.pth")
    assert_refused(tmp_path / "checkpoint.pth", f"links to {str(tmp_path / 'purged' / 'checkpoint.pth')!r}, which "
                                                f"does not exist")
    (tmp_path / "sub.pth").mkdir()
    message = assert_refused(tmp_path / "checkpoint_ep0099.pth", "has 3 more, then")
    assert "sub.pth" not in message and "checkpoint.pth" not in message


def draws() -> tuple:
    return torch.rand(5), np.random.rand(5), np.random.standard_normal(3), [random.random() for _ in range(5)]


@pytest.mark.parametrize("gauss_pending", [False, True])
def test_rng_state_round_trip_through_a_file(tmp_path, gauss_pending):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    if gauss_pending:
        np.random.standard_normal(1)  # numpy's legacy generator now holds a cached second Gaussian
    path = saved(tmp_path, state={"rng": checkpoint.rng_state()})
    first = draws()
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    checkpoint.set_rng_state(checkpoint.load(path)["rng"])
    second = draws()
    assert torch.equal(first[0], second[0])
    assert np.array_equal(first[1], second[1]) and np.array_equal(first[2], second[2])
    assert first[3] == second[3]


def test_trainer_checkpoints_load_safely(tiny_run):
    final = checkpoint.load(tiny_run / "checkpoint.pth", kind="pretrain", method="swav")
    first = checkpoint.load(tiny_run / "checkpoint_ep0001.pth", kind="pretrain", method="swav")
    assert (final["epoch"], final["step"], first["epoch"], first["step"]) == (2, 0, 1, 0)
    assert final["global_step"] == 2 * first["global_step"] == 2 * (898 // 64)
    assert set(final) >= {"model", "optimizer", "scaler", "rng", "method_random", "method_state", "args", "data_info"}
    assert final["args"]["width"] == 4 and final["data_info"]["num_samples"] == 898
    assert not all(torch.equal(final["model"][k], first["model"][k]) for k in final["model"])  # it trained
    last = checkpoint.load(tiny_run / "checkpoint_ep0002.pth")["model"]
    assert all(torch.equal(final["model"][k], last[k]) for k in final["model"])

def test_evaluation_refuses_a_checkpoint_that_is_not_a_trained_model(tiny_run, tmp_path):
    state = checkpoint.load(tiny_run / "checkpoint.pth")
    probe = saved(tmp_path, name="probe.pth", state={"classifier": torch.zeros(2)}, kind="linear")
    with pytest.raises(CheckpointError, match="a 'linear' checkpoint; expected pretrain or cluster"):
        load_run(tiny_run, str(probe), torch.device("cpu"))
    assert state["epoch"] == load_run(tiny_run, None, torch.device("cpu")).epoch == 2


def test_evaluation_refuses_a_checkpoint_of_a_run_on_other_data(tiny_run, tmp_path):
    """--checkpoint of another run, trained on an image folder, with --run a digits run: its args won over
    config.yaml's, so it was scored on that run's folder and recorded in this run's metrics.jsonl, with a note that
    this run had trained on the folder."""
    state = checkpoint.load(tiny_run / "checkpoint.pth")
    state["args"]["dataset"] = "imagefolder"
    other = saved(tmp_path, name="other.pth", state=state)
    with pytest.raises(CheckpointError) as err:
        load_run(tiny_run, str(other), torch.device("cpu"))
    assert str(err.value) == (f"checkpoint {str(other)!r} was trained on 'imagefolder', run {str(tiny_run)!r} on "
                              f"'digits': give --run the directory of the run that wrote it")


def test_weights_that_are_not_finite_are_refused_for_evaluation_and_as_a_first_stage(tiny_run, tmp_path):
    """An edited checkpoint with a NaN in one tensor: eval_knn scored chance from it, eval_cluster failed inside
    k-means, a second stage trained until its NaN guard stopped it."""
    from clusterlab.methods.cluster_base import read_pretrained

    run = copy_run(tiny_run, tmp_path / "run")
    state = checkpoint.load(run / "checkpoint.pth")
    name = next(key for key, value in state["model"].items() if value.is_floating_point())
    state["model"][name][0] = float("nan")
    checkpoint.save(state, run / "checkpoint.pth", kind="pretrain", method="swav")
    words = rf"holds non-finite weights \({re.escape(name)}\); training never saves"
    with pytest.raises(CheckpointError, match=words):
        load_run(run, None, torch.device("cpu"))
    with pytest.raises(CheckpointError, match=words):
        read_pretrained(str(run / "checkpoint.pth"))
    assert load_run(run, "checkpoint_ep0001.pth", torch.device("cpu")).epoch == 1


def test_finite_weights_whose_features_overflow_are_refused_by_every_evaluation(tiny_run, tmp_path):
    """What a diverging run keeps as its last good checkpoint: finite weights (batch-norm scales of 1e20 here, below
    float32's 3.4e38) whose eval-mode outputs overflow. eval_knn recorded chance (top-5 below top-1), eval_cluster
    failed inside k-means with scikit-learn's traceback. Refused on one line; nothing is recorded."""
    run = copy_run(tiny_run, tmp_path / "diverged")
    overflow(run, "pretrain", "swav")
    records = run / "metrics.jsonl"
    before = records.read_text() if records.exists() else None
    for script, flags in (("eval_knn.py", ["--k", "20"]), ("eval_cluster.py", []),
                          ("eval_linear.py", ["--epochs", "1", "--cached_features", "true"])):
        result = run_script(script, "--run", run, "--device", "cpu", *flags)
        assert_user_error(result, script, "non-finite", "checkpoint.pth", "evaluate an earlier checkpoint")
    assert (records.read_text() if records.exists() else None) == before


def test_features_too_large_to_normalise_are_refused_not_scored_as_chance(tiny_run, tmp_path):
    """The first convolution scaled by 1e30: the features stay finite, but their squares overflow, and normalised
    they were rows of zeros: eval_knn recorded top-1 10.23 (chance) and k-means found one cluster."""
    from clusterlab.models.heads import unit_rows

    rows = torch.tensor([[3e19, -4e19], [3.0, 4.0], [0.0, 0.0]])
    assert torch.isnan(unit_rows(rows)[0]).all()
    assert torch.equal(unit_rows(rows)[1:], torch.nn.functional.normalize(rows[1:], dim=1))
    run = copy_run(tiny_run, tmp_path / "huge")
    state = checkpoint.load(run / "checkpoint.pth")
    state["model"]["backbone.conv1.weight"].mul_(1e30)
    checkpoint.save(state, run / "checkpoint.pth", kind="pretrain", method="swav")
    # (the embedding is normalised inside the model: its rows were zeros before the evaluation saw them)
    for script, flags in (("eval_knn.py", ["--k", "20"]), ("eval_cluster.py", []),
                          ("eval_knn.py", ["--k", "20", "--features", "embedding"]),
                          ("eval_cluster.py", ["--features", "embedding"])):
        result = run_script(script, "--run", run, "--device", "cpu", *flags)
        assert_user_error(result, script, "non-finite", "checkpoint.pth", "evaluate an earlier checkpoint")
    assert not (run / "metrics.jsonl").exists()


def overflow(run: Path, kind: str, method: str) -> None:
    """Scale the backbone's batch-norm weights by 1e20: finite, but the eval-mode outputs overflow."""
    state = checkpoint.load(run / "checkpoint.pth")
    scales = [name for name in state["model"] if name.startswith("backbone.") and name.endswith("bn1.weight")]
    assert len(scales) >= 2
    for name in scales:
        state["model"][name].mul_(1e20)
    checkpoint.save(state, run / "checkpoint.pth", kind=kind, method=method)


def test_head_assignments_of_weights_whose_logits_overflow_are_refused(tmp_path):
    """eval_cluster's default for a class-assignment run, its heads: argmax over NaN logits still picks a class, and
    the record said ACC 10 %, NMI 0."""
    run = tmp_path / "selfclassifier"
    assert_ok(run_script("main_cluster.py", "--method", "selfclassifier", "--dataset", "digits", "--width", "4",
                         "--batch_size", "32", "--size_crops", "8", "--epochs", "1", "--head_classes", "10",
                         "--hidden_dim", "32", "--embed_dim", "16", "--device", "cpu", "--output_dir", run))
    overflow(run, "cluster", "selfclassifier")
    result = run_script("eval_cluster.py", "--run", run, "--device", "cpu")
    assert_user_error(result, "eval_cluster.py", "non-finite head logits", "checkpoint.pth")
    assert not (run / "metrics.jsonl").exists()


def test_a_pretrained_value_that_is_no_training_run_is_refused_naming_the_flag_and_what_it_takes(tmp_path):
    """--pretrained at an evaluation's folder (metrics.jsonl only), at a file that is no checkpoint, or at a linear
    probe's checkpoint: one line naming --pretrained and its value, and what it takes."""
    from clusterlab.methods.cluster_base import read_pretrained

    folder = tmp_path / "pixels_digits"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("{}\n")
    probe = tmp_path / "linear_ep0002"
    probe.mkdir()
    checkpoint.save({"model": {}}, probe / "checkpoint.pth", kind="linear", method="linear")
    for value in (folder, folder / "metrics.jsonl", probe, tmp_path / "missing"):
        with pytest.raises(CheckpointError) as err:
            read_pretrained(str(value))
        message = str(err.value)
        assert message.startswith(f"--pretrained {str(value)!r}: ") and "\n" not in message
        assert "main_pretrain.py or main_cluster.py run that finished training" in message


@pytest.mark.parametrize("entry", ["model", "args"])
def test_a_pretrained_checkpoint_without_its_weights_or_args_is_refused_on_one_line(tmp_path, entry):
    """main_cluster.py --pretrained at a checkpoint whose `model` (or `args`) was removed or replaced: a KeyError's
    traceback from the code that reads the weights."""
    from clusterlab.methods.cluster_base import read_pretrained

    state = {"model": {"backbone.w": torch.zeros(2)}, "args": {"method": "swav"}, "epoch": 1, "step": 0}
    for broken in ({key: value for key, value in state.items() if key != entry}, {**state, entry: [1, 2]}):
        path = saved(tmp_path, state=broken)
        with pytest.raises(CheckpointError) as err:
            read_pretrained(str(path))
        assert str(err.value) == (f"--pretrained {str(path)!r}: checkpoint {str(path)!r} holds no {entry!r} "
                                  f"mapping, as every checkpoint main_pretrain.py and main_cluster.py write does: it "
                                  f"was edited or written by other code; give a run's directory or one of its "
                                  f"checkpoint files")
