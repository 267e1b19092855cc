"""`--compile`: torch.compile for the backbone, where nearly all of a step's arithmetic is.

The backbone is compiled in place (`nn.Module.compile`): the module tree, its parameter and buffer names and so the
state dict stay those of the eager model, so a checkpoint written with `--compile` loads without it and the other
way round. Heads, losses, Sinkhorn, queues and memory banks stay eager: they are small, and their Python-side state
(queues that advance, banks updated after the backward pass, generators) would only split the graph.

Compilation happens at the first forward pass. Whether torch.compile can work here at all (inductor needs a C++
compiler on the CPU and Triton on CUDA) is tried first on a tiny function on the training device, so that a machine
where it cannot work refuses the flag with one line before anything trains.
"""
from __future__ import annotations

import logging
import warnings

import torch
import torch.nn as nn

from .errors import ConfigError


def compile_backbone(method: nn.Module, device: torch.device) -> None:
    """Compile `method.backbone`'s forward in place, after checking that torch.compile works on `device`."""
    check_compile_works(device)
    method.backbone.compile()


def check_compile_works(device: torch.device) -> None:
    """Raise a one-line ConfigError saying why when torch.compile fails on a tiny function on `device`."""
    torch_logger = logging.getLogger("torch")
    level = torch_logger.level
    torch_logger.setLevel(logging.ERROR)  # torch logs its own warnings about the failure; the reason is ours to give
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            probe = torch.compile(lambda x: x * 2.0 + 1.0)
            probe(torch.ones(8, device=device))
    except Exception as err:  # any failure of the compiler stack means the flag cannot work here
        raise ConfigError(f"--compile: torch.compile does not work on {device.type} here ({compiler_error_line(err)}); "
                          f"run without --compile") from None
    finally:
        torch_logger.setLevel(level)


def compiler_error_line(err: Exception) -> str:
    """The line of a compiler error that says what went wrong (torch puts "backend=... raised:" before it)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if lines and lines[0].endswith("raised:") and len(lines) > 1:
        lines = lines[1:]
    return (lines[0] if lines else type(err).__name__)[:200]
