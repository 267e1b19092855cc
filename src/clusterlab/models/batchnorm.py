"""Batch normalisation over the global batch.

On CUDA this is torch's SyncBatchNorm. torch's version refuses CPU tensors, so on the CPU (gloo) we use
`GlobalBatchNorm`: the per-channel sums are all-reduced with a differentiable all-reduce, which makes a step on
W processes compute what one process computes on the concatenated batch (the distributed tests rely on it).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .. import distributed


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose batch statistics (two-pass mean and biased variance) cover the samples of all ranks."""

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and distributed.is_initialized()):
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        # Statistics in float32 at least, as torch's batch norm keeps them under autocast: in fp16 the sums of a
        # large batch overflow (65504) and bf16 cannot even hold the count exactly.
        dtype = x.dtype
        x = x.to(torch.promote_types(dtype, torch.float32))
        count = distributed.all_reduce_sum_with_grad(torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype,
                                                                  device=x.device))
        mean = distributed.all_reduce_sum_with_grad(x.sum(dims)) / count
        centred = x - mean.view(shape)
        var = distributed.all_reduce_sum_with_grad((centred * centred).sum(dims)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * count / (count - 1).clamp(min=1)
                self.running_mean.mul_(1 - momentum).add_(momentum * mean)
                self.running_var.mul_(1 - momentum).add_(momentum * unbiased)
        out = centred / torch.sqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(dtype)


def share_norm_statistics(module: nn.Module) -> None:
    """Collective: rank 0's running statistics of `module`'s per-rank batch norms on every rank (those of
    --sync_bn's global-batch layers are the same everywhere already). Without synchronised batch norm each rank
    updates its own from its share of the batches: passes in eval mode (the kNN monitor, SeLa's eval-view labelling)
    would normalise each rank's share differently, and a run resumed from a checkpoint (rank 0's statistics) would
    differ from one that went on. Rank 0's are what checkpoints keep, and what DataParallel's replicas used."""
    if not distributed.is_initialized():
        return
    buffers = [buffer for norm in module.modules()
               if isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.track_running_stats
               and not isinstance(norm, (nn.SyncBatchNorm, GlobalBatchNorm))
               for buffer in (norm.running_mean, norm.running_var, norm.num_batches_tracked)]
    for dtype in dict.fromkeys(buffer.dtype for buffer in buffers):  # one broadcast per dtype
        same = [buffer for buffer in buffers if buffer.dtype == dtype]
        flat = distributed.broadcast(torch.cat([buffer.reshape(-1) for buffer in same]))
        for buffer, value in zip(same, flat.split([buffer.numel() for buffer in same])):
            buffer.copy_(value.view_as(buffer))


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace every BatchNorm by its global-batch version (no-op in a single process)."""
    if not distributed.is_initialized():
        return module
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert_cpu(module)


def _convert_cpu(module: nn.Module) -> nn.Module:
    converted = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        converted = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                    module.track_running_stats)
        # The module's own parameters and buffers, and its mode, as torch's conversion keeps them: a frozen batch
        # norm (the linear probe's backbone) stays frozen and in eval mode.
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        if module.track_running_stats:
            converted.running_mean, converted.running_var = module.running_mean, module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
    for name, child in module.named_children():
        converted.add_module(name, _convert_cpu(child))
    return converted
