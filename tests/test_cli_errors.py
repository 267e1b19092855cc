"""Bad input to the real entry scripts: exit status 2, exactly one line on stderr that names the bad value (and what
would be valid), and nothing written: the output directory does not appear, or is left byte for byte as it was.

The cases the project brief names run the scripts as subprocesses; the others call the same `run_cli(main)` in this
process, which is what `python SCRIPT` runs, to keep the suite light.
"""
from __future__ import annotations

import pytest

from clusterlab import checkpoint
from conftest import ROOT, TINY, assert_user_error, copy_run, run_script, snapshot, write_fashion_mnist


@pytest.mark.parametrize("case, extra, words", [
    ("missing data path", ["--dataset", "fashion_mnist", "--data_path", "/nonexistent"],
     ["'/nonexistent'", "does not exist", "--data_path", "--download"]),
    ("unknown dataset", ["--dataset", "nosuch"], ["--dataset", "'nosuch'", "digits", "fashion_mnist"]),
    ("unknown method", ["--method", "nosuch"], ["--method", "'nosuch'", "swav"]),
    ("unknown flag", ["--bogus_flag", "3"], ["unrecognized arguments: --bogus_flag 3"]),
])
def test_pretrain_bad_input(tmp_path, case, extra, words):
    out = tmp_path / "run"
    result = run_script("main_pretrain.py", *TINY, "--output_dir", out, *extra)
    assert_user_error(result, "main_pretrain.py", *words)
    assert not out.exists()


@pytest.mark.parametrize("case, extra, words", [
    ("bad number", ["--batch_size", "many"], ["--batch_size", "'many'"]),
    ("zero batch", ["--batch_size", "0"], ["--batch_size", "'0'", "positive integer"]),
    ("batch above dataset", ["--batch_size", "5000"], ["--batch_size 5000", "898 samples"]),
    ("unknown split", ["--train_split", "bogus"], ["'bogus'", "train, test"]),
    ("unknown arch", ["--arch", "vgg"], ["--arch 'vgg'", "resnet18_cifar"]),
    ("missing config", ["--config", "/nonexistent.yaml"], ["'/nonexistent.yaml'", "does not exist"]),
    ("config a folder", ["--config", "/tmp"], ["config file '/tmp' is a folder (give a YAML file"]),
    # it failed at the first step inside a max-pool, with status.json "failed"
    ("crops too small for the arch", ["--arch", "alexnet_bn", "--size_crops", "8"],
     ["--arch alexnet_bn takes images of 63 px or more; this run gives it 8 px (--size_crops 8, a test view of 8 px)"]),
    ("test view too small for the arch", ["--arch", "alexnet_bn", "--size_crops", "64", "--eval_crop", "32"],
     ["this run gives it 32 px (--size_crops 64, a test view of 32 px)"]),
    # --hue alone is checked by the parser; a strength scaled it past half the colour circle (the jitter wraps)
    ("hue jitter past half the circle", ["--hue", "0.4", "--color_strength", "2"],
     ["--color_strength 2 x --hue 0.4 is a hue jitter of 0.8; the product must be at most 0.5"]),
    # numpy's and scikit-learn's generators stop at 2^32 - 1 (a traceback, or an overflow in torch)
    ("negative seed", ["--seed", "-1"], ["--seed", "'-1' is not a seed (use 0 to 4294967295)"]),
    ("huge seed", ["--seed", "99999999999999999999"], ["is not a seed (use 0 to 4294967295)"]),
    ("negative step factor", ["--lr_gamma", "-1"], ["--lr_gamma", "'-1' is not a positive number"]),
    ("momentum above 1", ["--momentum", "5"], ["--momentum", "'5' is not a probability"]),
    ("rate beyond float32", ["--lr", "1e40"], ["--lr", "'1e40' is beyond float32's range"]),
    ("rate of zero", ["--lr", "0"], ["--lr", "'0' is not a positive number (use a value above 0)"]),  # trained nothing
    # 1e20 epochs overflowed the steps' count and trained on
    ("epochs past any run", ["--epochs", "10" * 10],
     ["--epochs", f"'{'10' * 10}' epochs is more than any run needs (use 1 to 100,000)"]),
    # fractions of the image's area: above 1 every crop was the fallback crop, without a word
    ("crop scale above 1", ["--min_scale_crops", "0.5", "--max_scale_crops", "2"],
     ["--max_scale_crops", "'2' is not a share of the image's area (use a value above 0, at most 1)"]),
    # an unknown flag is followed by what was probably meant
    ("typo of a flag", ["--epoch", "3"], ["unrecognized arguments: --epoch 3 (did you mean --epochs?)"]),
    ("flag of no method", ["--bogus_flag", "3"],
     ["unrecognized arguments: --bogus_flag 3 (not a flag of main_pretrain.py; see --help)"]),
])
def test_pretrain_more_bad_input(run_in_process, tmp_path, case, extra, words):
    out = tmp_path / "run"
    assert_user_error(run_in_process("main_pretrain.py", *TINY, "--output_dir", out, *extra), "main_pretrain.py",
                      *words)
    assert not out.exists()


def test_a_flag_of_another_method_is_named_so(run_in_process, tmp_path):
    refused = run_in_process("main_pretrain.py", "--config", ROOT / "configs" / "npid_fashion_mnist.yaml", "--dataset",
                             "digits", "--nmb_prototypes=10", "--output_dir", tmp_path / "run")
    assert_user_error(refused, "main_pretrain.py",
                      "unrecognized arguments: --nmb_prototypes=10 (--method npid does not take it; swav, unmix do)")
    refused = run_in_process("main_cluster.py", "--method", "sela", "--queue_length", 3, "--output_dir",
                             tmp_path / "run")
    assert_user_error(refused, "main_cluster.py", "--queue_length 3 (--method sela does not take it; selfclassifier "
                                                  "does)")
    assert not (tmp_path / "run").exists()


def test_an_upstream_flag_whose_opposite_is_ours_says_which_to_give(run_in_process, tmp_path):
    """EmbedUL's --train_heads has no alias (ours, --freeze_heads, says the opposite): it was refused as no flag."""
    refused = run_in_process("main_cluster.py", "--method", "embedul", "--train_heads", "true", "--output_dir",
                             tmp_path / "run")
    assert_user_error(refused, "main_cluster.py", "unrecognized arguments: --train_heads true (EmbedUL's "
                      "--train_heads is the opposite of --freeze_heads here: give --freeze_heads false to train the "
                      "heads)")
    assert not (tmp_path / "run").exists()


def test_pretrain_truncated_idx_file(tmp_path):
    data = write_fashion_mnist(tmp_path / "fashion", cut=500)
    out = tmp_path / "run"
    result = run_script("main_pretrain.py", *TINY, "--dataset", "fashion_mnist", "--data_path", data,
                        "--output_dir", out)
    assert_user_error(result, "main_pretrain.py", "train-images-idx3-ubyte.gz", "truncated", "expected 78400")
    assert not out.exists()


def test_pretrain_truncated_gzip_stream(run_in_process, tmp_path):
    data = write_fashion_mnist(tmp_path / "fashion")
    images = tmp_path / "fashion" / "train-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:300])
    result = run_in_process("main_pretrain.py", *TINY, "--dataset", "fashion_mnist", "--data_path", data,
                            "--output_dir", tmp_path / "run")
    assert_user_error(result, "main_pretrain.py", str(images), "cannot be read")
    assert not (tmp_path / "run").exists()


def test_pretrain_refuses_a_corrupt_checkpoint_in_its_output_dir(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    path = run / "checkpoint.pth"
    path.write_bytes(path.read_bytes()[:1000])
    before = snapshot(run)
    result = run_script("main_pretrain.py", *TINY, "--output_dir", run)
    assert_user_error(result, "main_pretrain.py", repr(str(path)), "corrupt or not a torch file")
    assert snapshot(run) == before


def test_pretrain_refuses_an_output_dir_that_is_a_file(run_in_process, tmp_path):
    out = tmp_path / "run"
    out.write_text("a file\n")
    result = run_in_process("main_pretrain.py", *TINY, "--output_dir", out)
    assert_user_error(result, "main_pretrain.py", f"--output_dir {str(out)!r} is a file")
    assert out.read_text() == "a file\n"


@pytest.mark.parametrize("script, config, words", [
    ("main_pretrain.py", "configs/sela_cifar10_resnet.yaml",
     ["--method 'sela' is trained by main_cluster.py; main_pretrain.py trains npid, superand, swav, unmix"]),
    ("main_cluster.py", "configs/swav_digits.yaml", ["--method 'swav'", "is trained by main_pretrain.py"]),
    ("main_pretrain.py", "MISSPELT", ["--method 'swavv'", "is not a method; main_pretrain.py trains npid"]),
])
def test_a_config_of_the_other_program_or_a_misspelt_method_is_named(run_in_process, tmp_path, script, config, words):
    """It was refused for the first key only the other method has ('unknown key head_classes')."""
    misspelt = tmp_path / "misspelt.yaml"
    misspelt.write_text("method: swavv\nepsilon: 0.1\n")
    path = misspelt if config == "MISSPELT" else ROOT / config
    assert_user_error(run_in_process(script, "--config", path, "--output_dir", tmp_path / "run"), script, *words)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("script, method, words", [
    ("main_pretrain.py", "sela", "is trained by main_cluster.py; main_pretrain.py trains npid, superand, swav, unmix"),
    ("main_cluster.py", "swav", "is trained by main_pretrain.py; main_cluster.py trains embedul"),
    ("main_pretrain.py", "swavv", "is not a method; main_pretrain.py trains npid"),
])
def test_the_other_programs_method_on_the_command_line_is_named(run_in_process, tmp_path, script, method, words):
    """On the command line it got argparse's 'invalid choice' alone; from a config file, the program that trains it."""
    result = run_in_process(script, "--method", method, "--output_dir", tmp_path / "run")
    assert_user_error(result, script, f"--method {method!r} {words}")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("script, extra", [
    ("main_pretrain.py", [*TINY, "--output_dir", "LINK"]),
    ("eval_knn.py", ["--baseline", "pixels", "--dataset", "digits", "--output_dir", "FILE"]),
    ("collect_results.py", ["--root", "RUN", "--out", "FILE"]),
])
def test_an_output_path_where_a_file_or_a_dangling_link_stands_is_one_line(run_in_process, tiny_run, tmp_path, script,
                                                                             extra):
    (tmp_path / "file").write_text("a file\n")
    (tmp_path / "link").symlink_to(tmp_path / "nowhere" / "deep")
    names = {"FILE": tmp_path / "file", "LINK": tmp_path / "link", "RUN": copy_run(tiny_run, tmp_path / "run")}
    result = run_in_process(script, *[names.get(arg, arg) for arg in extra])
    assert_user_error(result, script, "cannot write", "choose another path")
    assert (tmp_path / "file").read_text() == "a file\n" and not (tmp_path / "nowhere").exists()


def test_pretrain_bad_yaml_key(run_in_process, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("method: swav\nepochs: 2\nnmb_prototype: 10\n")
    result = run_in_process("main_pretrain.py", "--config", config, "--output_dir", tmp_path / "run")
    assert_user_error(result, "main_pretrain.py", str(config), "unknown key 'nmb_prototype'",
                      "(did you mean --nmb_prototypes?)")
    assert not (tmp_path / "run").exists()
    config.write_text("method: npid\nepochs: 2\nnmb_prototypes: 10\n")
    result = run_in_process("main_pretrain.py", "--config", config, "--output_dir", tmp_path / "run")
    assert_user_error(result, "main_pretrain.py", "unknown key 'nmb_prototypes'",
                      "(--method npid does not take it; swav, unmix do)")


@pytest.mark.parametrize("damage, words", [
    # torch said "failed finding central directory", "[Errno 22] Invalid argument" or "legacy .tar format"
    (lambda data: data[:2000], "truncated: a zip archive without its end"),
    (lambda data: data[:len(data) // 2], "truncated: a zip archive without its end"),
    (lambda data: bytes(len(data)), "its first bytes are neither a zip archive's nor a pickle's"),
], ids=["cut-early", "cut-in-the-middle", "zeros"])
def test_eval_knn_refuses_a_corrupt_checkpoint(tiny_run, tmp_path, damage, words):
    run = copy_run(tiny_run, tmp_path / "run")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(damage((run / "checkpoint.pth").read_bytes()))
    before = snapshot(run)
    result = run_script("eval_knn.py", "--run", run, "--checkpoint", bad, "--device", "cpu")
    assert_user_error(result, "eval_knn.py", repr(str(bad)), "corrupt or not a torch file", words)
    assert snapshot(run) == before  # in particular no metrics.jsonl


def edited(path, change) -> None:
    """Rewrite a trainer checkpoint with `change` applied to its entries, tags kept: what another version of the
    code, or a hand edit, could leave."""
    state = checkpoint.load(path)
    tags = {key: state.pop(key) for key in ("format", "schema", "kind", "method")}
    change(state)
    checkpoint.save(state, path, kind=tags["kind"], method=tags["method"])


@pytest.mark.parametrize("change, words", [
    (lambda state: state["model"].popitem(), ["does not fit run", "Missing key"]),
    (lambda state: state.pop("data_info"), ["does not fit run", "no entry 'data_info'"]),
    (lambda state: state["args"].update(width=8), ["does not fit run", "size mismatch"]),
    (lambda state: state.update(args=["swav"]), ["does not fit run", "args are not a mapping"]),
    (lambda state: state["args"].update(method="npid"), ["trained by method 'npid'", "by 'swav'",
                                                         "the directory of the run that wrote it"]),
], ids=["missing-weight", "no-data-info", "other-width", "args-a-list", "other-method"])
def test_eval_refuses_a_checkpoint_that_does_not_fit_its_run(run_in_process, tiny_run, tmp_path, change, words):
    run = copy_run(tiny_run, tmp_path / "run")
    edited(run / "checkpoint.pth", change)
    before = snapshot(run)
    result = run_in_process("eval_knn.py", "--run", run, "--device", "cpu", "--k", "5")
    assert_user_error(result, "eval_knn.py", repr(str(run / "checkpoint.pth")), *words)
    assert snapshot(run) == before


@pytest.mark.parametrize("script, extra, words", [
    ("eval_knn.py", ["--run", "/nonexistent_run"], ["--run '/nonexistent_run'", "not a directory"]),
    ("eval_knn.py", ["--checkpoint", "checkpoint_ep0099.pth"],
     ["checkpoint_ep0099.pth", "does not exist;", "run'", "has checkpoint.pth"]),  # (it named none of the run's)
    ("eval_cluster.py", ["--clusters", "10", "5000"], ["--clusters 5000", "898 images", "at most 898"]),
    ("eval_cluster.py", ["--clusters", "1"], ["--clusters", "'1' clusters: a clustering needs 2 or more"]),
    ("eval_knn.py", ["--output_dir", "elsewhere"], ["--output_dir 'elsewhere' is where a --baseline's record goes"]),
    ("eval_cluster.py", ["--output_dir", "elsewhere"], ["a run's go to its own metrics.jsonl"]),
    ("eval_knn.py", ["--baseline", "pixels", "--dataset", "digits", "--output_dir", "OUT"],
     ["--baseline pixels scores no run", "leave --run out"]),
    ("eval_cluster.py", ["--normalize", "maybe"], ["--normalize", "'maybe'", "use auto, true or false"]),
])
def test_eval_bad_input_writes_nothing(run_in_process, tiny_run, tmp_path, script, extra, words):
    run = copy_run(tiny_run, tmp_path / "run")
    before = snapshot(run)
    argv = ["--run", run, *extra] if "--run" not in extra else extra
    result = run_in_process(script, *argv, "--device", "cpu")
    assert_user_error(result, script, *words)
    assert snapshot(run) == before


def test_a_missing_checkpoint_names_the_runs_latest_ones(run_in_process, tiny_run, tmp_path):
    """Of a run with many epoch checkpoints, the line names the last four by name (the likeliest meant), not every
    one."""
    run = copy_run(tiny_run, tmp_path / "run")
    for epoch in range(3, 10):
        (run / f"checkpoint_ep{epoch:04d}.pth").write_bytes(b"")
    result = run_in_process("eval_knn.py", "--run", run, "--checkpoint", "checkpoint_ep0099.pth", "--device", "cpu")
    assert_user_error(result, "eval_knn.py", "has 6 more, then checkpoint_ep0006.pth, checkpoint_ep0007.pth, "
                                             "checkpoint_ep0008.pth, checkpoint_ep0009.pth")


def test_eval_cluster_baseline_needs_an_output_dir(run_in_process):
    result = run_in_process("eval_cluster.py", "--baseline", "pixels", "--dataset", "digits")
    assert_user_error(result, "eval_cluster.py", "--baseline pixels needs", "--output_dir DIR")


@pytest.mark.parametrize("extra, words", [
    (["--root", "/nonexistent_root"], ["--root '/nonexistent_root'", "not a directory"]),
    (["--published", "/nonexistent.csv"], ["--published '/nonexistent.csv'", "does not exist"]),
    (["--published", "/tmp"], ["--published '/tmp' is a folder (give a CSV file"]),
    (["--published", "PUBLISHED"], ["lacks the column(s) epochs, metric", "expected: method, dataset"]),
    (["--published", "LATIN1"], ["--published", "is not a CSV file of UTF-8 text (UnicodeDecodeError"]),  # a traceback
    # the cells of a row: a traceback once a row matched ours, or silently a published number beside no metric
    (["--published", "VALUE"], ["row 2 below the header: value '50,0' is not a number"]),
    (["--published", "METRIC"], ["row 2 below the header: metric 'top_1' is not a metric of the tables (one of: top1"]),
    (["--published", "COMPARE"], ["row 2 below the header: compare_to 'acc1' is not a metric", "; or blank"]),
    (["--published", "EPOCHS"], ["row 2 below the header: epochs 2.5 is not a whole number of epochs"]),
    (["--published", "NOMETRIC"], ["row 2 below the header: no metric (one of: top1"]),
    (["--published", "NOSOURCE"], ["row 2 below the header: no source (the paper or code"]),  # "nan (nan)"
    (["--out", "/proc/clusterlab_no_folder"], ["cannot create the tables folder '/proc/clusterlab_no_folder' (No such "
                                               "file or directory): choose another --out"]),  # a traceback
])
def test_collect_results_bad_input(run_in_process, tmp_path, extra, words):
    root, out = tmp_path / "runs", tmp_path / "tables"
    (root / "run").mkdir(parents=True)
    (root / "run" / "metrics.jsonl").write_text('{"method": "swav", "dataset": "digits", "eval": "cluster", '
                                                '"protocol": {}, "metrics": {"acc": 0.5}}\n')
    published = tmp_path / "published.csv"
    published.write_text("method,dataset,eval,value\nswav,digits,cluster,50\n")
    (tmp_path / "latin1.csv").write_bytes("method,dataset\nswav,caf\xe9\n".encode("latin-1"))
    files = {"PUBLISHED": published, "LATIN1": tmp_path / "latin1.csv"}
    good = "swav,digits,resnet18_cifar_w4,200,cluster,acc,50,k-means,paper,"
    bad = {"VALUE": 'swav,digits,,200,cluster,acc,"50,0",k-means,paper,', "METRIC": good.replace(",acc,", ",top_1,"),
           "COMPARE": good + "acc1", "EPOCHS": good.replace(",200,", ",2.5,"), "NOMETRIC": good.replace(",acc,", ",,"),
           "NOSOURCE": good.replace(",paper,", ",,")}
    for name, row in bad.items():
        files[name] = tmp_path / f"{name}.csv"
        files[name].write_text(f"method,dataset,backbone,epochs,eval,metric,value,protocol,source,compare_to\n"
                               f"{good}\n{row}\n")
    argv = ["--root", root, "--out", out, *[files.get(a, a) for a in extra]]
    result = run_in_process("collect_results.py", *argv)
    assert_user_error(result, "collect_results.py", *words)
    assert not out.exists()


def test_knn_monitor_without_labelled_training_images(run_in_process, tmp_path):
    """STL-10's unlabeled split: the monitor would vote with no neighbours and log class 0's share as top-1."""
    import fabricate

    data, out = fabricate.make_stl10(tmp_path / "stl"), tmp_path / "run"
    result = run_in_process("main_pretrain.py", *TINY, "--dataset", "stl10", "--data_path", data, "--train_split",
                            "unlabeled", "--batch_size", "8", "--knn_monitor_every", "1", "--output_dir", out)
    assert_user_error(result, "main_pretrain.py", "--knn_monitor_every 1", "--train_split unlabeled", "has none")
    assert not out.exists()
