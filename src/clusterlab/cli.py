"""Flags shared by the entry scripts, so that each script's parser says only what is its own."""
from __future__ import annotations

import argparse

from .config import (bool_flag, epoch_count, learning_rate, non_negative_float, non_negative_int, path, positive_float,
                     positive_int, probability, seed)
from .data import DATASETS


def add_data_args(parser: argparse.ArgumentParser, default_dataset: str | None = "digits") -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", choices=sorted(DATASETS), default=default_dataset)
    group.add_argument("--data_path", type=path, default=None,
                       help="dataset directory (default: the dataset's own, e.g. /usr/share/datasets/fashion-mnist, "
                            "else $DATASET_PATH, else ./data)")
    group.add_argument("--download", type=bool_flag, nargs="?", const=True, default=False,
                       help="download the dataset if missing (rank 0 only)")
    group.add_argument("--eval_crop", type=non_negative_int, default=0,
                       help="test view size (0: the largest --size_crops; a pixel baseline: the images' size); "
                            "in-memory sets are resized whole to it; at most 8 times the images' size")
    group.add_argument("--eval_resize", type=non_negative_int, default=0,
                       help="image folders: shorter side resized to this before the centre crop of --eval_crop "
                            "(0: the crop size; ImageNet: 256 for 224)")


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("runtime")
    group.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    group.add_argument("--workers", type=non_negative_int, default=0, help="data loader processes (image folders only)")
    group.add_argument("--seed", type=seed, default=0)


def add_optim_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("optimisation")
    group.add_argument("--epochs", type=epoch_count, default=100)
    group.add_argument("--batch_size", type=positive_int, default=256, help="global batch, over all ranks")
    group.add_argument("--optimizer", choices=["sgd", "lars", "adam"], default="sgd")
    group.add_argument("--lr", type=learning_rate, default=0.03, help="base learning rate")
    group.add_argument("--final_lr", type=non_negative_float, default=0.0, help="cosine schedule's final learning rate")
    group.add_argument("--schedule", choices=["cosine", "step", "constant"], default="cosine")
    group.add_argument("--warmup_epochs", type=non_negative_float, default=0)
    group.add_argument("--start_warmup", type=non_negative_float, default=0.0,
                       help="learning rate at the start of warm-up")
    group.add_argument("--lr_drops", type=non_negative_int, nargs="*", default=[],
                       help="epochs of the step schedule's drops")
    group.add_argument("--lr_gamma", type=positive_float, default=0.1, help="factor of each step drop")
    group.add_argument("--schedule_period", type=non_negative_int, default=0,
                       help="restart the schedule every N epochs (0: never)")
    group.add_argument("--momentum", type=probability, default=0.9)
    group.add_argument("--nesterov", type=bool_flag, default=False)
    group.add_argument("--weight_decay", type=non_negative_float, default=1e-6)
    group.add_argument("--no_decay_bias_norm", type=bool_flag, default=False,
                       help="no weight decay on biases and norm weights (1-D parameters)")
    group.add_argument("--lars_trust", type=positive_float, default=0.001, help="LARS trust coefficient")
    group.add_argument("--lars_exclude_bias_norm", type=bool_flag, default=False,
                       help="keep biases and norm weights out of LARS: plain momentum SGD without weight decay for them, "
                            "whatever --no_decay_bias_norm says (upstream SwAV includes them)")
    group.add_argument("--amp", choices=["auto", "off", "bf16", "fp16"], default="auto",
                       help="mixed precision: bf16 or fp16 autocast on any device (fp16 with a gradient scaler); "
                            "auto: bf16 on CUDA from Ampere on, fp16 on older cards, float32 on the CPU; off: float32 "
                            "throughout (cuDNN's TF32 convolutions, PyTorch's default on Ampere, are off). "
                            "config.yaml records what ran")
    group.add_argument("--compile", type=bool_flag, nargs="?", const=True, default=False,
                       help="torch.compile the backbone (its state-dict keys stay the same: checkpoints resume with "
                            "or without it); the first step then takes as long as the compilation")
    group.add_argument("--channels_last", type=bool_flag, nargs="?", const=True, default=False,
                       help="keep the model's 4-D weights, and so its activations, in channels-last memory order "
                            "(faster convolutions on the CPU measured in bench/RESULTS.md); the same arithmetic up "
                            "to float rounding, and checkpoints continue with or without it. On the CPU, torch "
                            "2.14.1's convolution backward crashed (a segmentation fault) on channels-last crops of "
                            "48 px and more: a note at start says so")
    group.add_argument("--sync_bn", type=bool_flag, default=True, help="batch norm over the global batch")
    group.add_argument("--find_unused", type=bool_flag, default=False, help="DDP find_unused_parameters")


def add_run_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("run directory")
    group.add_argument("--output_dir", type=path, default=None, help="run directory (default: runs/METHOD_DATASET)")
    group.add_argument("--checkpoint_epochs", type=positive_int, nargs="*", default=[],
                       help="also keep checkpoint_epNNNN.pth after these epochs")
    group.add_argument("--log_every", type=positive_int, default=50, help="steps between progress lines")
    group.add_argument("--knn_monitor_every", type=non_negative_int, default=0,
                       help="weighted kNN on the test split every N epochs, logged to train_log.jsonl (0: never)")
    group.add_argument("--knn_monitor_k", type=positive_int, default=200, help="the monitor's k (1: nearest neighbour)")
    group.add_argument("--knn_monitor_features", choices=["auto", "memory_bank", "recomputed"], default="auto",
                       help="the monitor's train features: the memory bank (upstream's monitor) or recomputed; "
                            "auto: the bank where the method keeps one")


def add_eval_args(parser: argparse.ArgumentParser, batch_size: bool = True, features: bool = True) -> None:
    """--run and friends; `batch_size` False leaves --batch_size to a program that trains (eval_linear.py), and
    `features` False leaves out --features (the linear probe trains on the backbone only)."""
    group = parser.add_argument_group("what to evaluate")
    group.add_argument("--run", type=path, default=None,
                       help="run directory (its config.yaml names the dataset and model)")
    group.add_argument("--checkpoint", type=path, default=None,
                       help="a file name is the run directory's file (default: checkpoint.pth); a path with a "
                            "directory is that file, recorded in the run's metrics.jsonl under its full path")
    add_data_args(parser, default_dataset=None)
    if features:
        group.add_argument("--features", choices=["backbone", "embedding"], default="backbone",
                           help="backbone features, or the method's own normalised embedding (SeLa and SCAN have none)")
    if batch_size:
        group.add_argument("--batch_size", type=positive_int, default=512, help="images per forward pass")
    group.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    group.add_argument("--workers", type=non_negative_int, default=0)
    group.add_argument("--skip_recorded", type=bool_flag, default=False,
                       help="do nothing when RUN/metrics.jsonl already has this evaluation of this checkpoint (of the "
                            "run's own data: with --dataset or --data_path the evaluation runs)")
