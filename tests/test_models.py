"""Backbones and heads (models/): output sizes, parameter counts, the padded stem, the three `--init` choices."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from clusterlab.errors import ConfigError
from clusterlab.models import Prototypes, build_backbone, projection_mlp
from clusterlab.models.resnet import resnet18_bottleneck, resnet18_cifar
from dist_utils import single_thread  # noqa: F401 - autouse fixture: one intra-op thread


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name,factor", [("resnet18_cifar", 8), ("resnet18_bottleneck", 32)])
@pytest.mark.parametrize("width", [4, 8])
@pytest.mark.parametrize("channels,size", [(3, 16), (1, 8)])
def test_output_dimension(name, factor, width, channels, size):
    model = build_backbone(name, channels, width).eval()
    assert model.out_dim == factor * width
    with torch.no_grad():
        out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, factor * width) and torch.isfinite(out).all()


def test_parameter_counts_at_width_64_match_upstream():
    """Un-Mix's bottleneck "resnet18" trunk (Bottleneck blocks [2, 2, 2, 2], UnMix_SwAV/for_CIFAR/src/resnet50.py) has
    13.94 M parameters, the BasicBlock CIFAR ResNet-18 11.17 M (counted from the upstream definitions, to two
    decimals: tolerance 0.005 M), and the pooled outputs are 2048 and 512."""
    basic, bottleneck = resnet18_cifar(3, 64), resnet18_bottleneck(3, 64)
    assert abs(count(basic) / 1e6 - 11.17) < 0.005
    assert abs(count(bottleneck) / 1e6 - 13.94) < 0.005
    assert (basic.out_dim, bottleneck.out_dim) == (512, 2048)


def test_parameter_count_of_basic_block_by_hand():
    """Width w, 3 input channels, convolutions without bias, BN with weight and bias:
    stem 27w + 2w; stage i (planes p, inputs q): conv 9qp + 9p^2 + 4p (+ 1x1 shortcut qp + 2p when it changes)
    and a second block 18p^2 + 4p."""
    w = 4
    total = 27 * w + 2 * w
    inputs = w
    for i in range(4):
        p = w * 2 ** i
        total += 9 * inputs * p + 9 * p * p + 4 * p
        if i > 0:
            total += inputs * p + 2 * p
        total += 18 * p * p + 4 * p
        inputs = p
    assert count(resnet18_cifar(3, w)) == total


def _shapes(model: nn.Module, x: torch.Tensor) -> list[tuple]:
    shapes = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape[-2:])))
             for m in (model.bn1, model.layer1, model.layer2, model.layer3, model.layer4)]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return shapes


def test_bottleneck_stem_pads_32_to_34():
    """Upstream's stem: ConstantPad2d(1) then conv 3x3/1/1: 32 -> 34, stages 34 -> 17 -> 9 -> 5."""
    model = resnet18_bottleneck(3, 4)
    assert _shapes(model, torch.randn(1, 3, 32, 32)) == [(34, 34), (34, 34), (17, 17), (9, 9), (5, 5)]
    # The pad is zeros: the border of the padded input is 0 for any image.
    padded = model.pad(torch.randn(1, 3, 32, 32))
    assert padded.shape[-1] == 34 and padded[..., 0, :].abs().sum() == 0 and padded[..., :, -1].abs().sum() == 0


def test_basic_block_stem_keeps_the_resolution():
    model = resnet18_cifar(3, 4)
    assert _shapes(model, torch.randn(1, 3, 32, 32)) == [(32, 32), (32, 32), (16, 16), (8, 8), (4, 4)]


@pytest.mark.parametrize("name", ["resnet18_cifar", "resnet18_bottleneck"])
def test_grey_input(name):
    model = build_backbone(name, 1, 4)
    assert model.conv1.weight.shape[1] == 1
    out = model(torch.randn(4, 1, 8, 8))
    out.sum().backward()
    assert model.conv1.weight.grad is not None and model.conv1.weight.grad.abs().sum() > 0


def conv_weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight.detach() for m in model.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("arch", ["resnet18_cifar", "resnet18_bottleneck", "resnet18_sobel"])
def test_init_default_is_pytorchs_and_kaiming_is_fan_out_normal(arch):
    """`--init default` (upstream NPID, Super-AND and EmbedUL CIFAR code) leaves PyTorch's convolution init,
    kaiming-uniform with a = sqrt(5), i.e. U(-b, b) with b = 1 / sqrt(fan_in): every weight within b and, in each
    layer of at least 4096 weights, the std b / sqrt(3) within 5 %. `--init kaiming` (torchvision, SwAV): normal
    with std sqrt(2 / fan_out) within 5 %, so sqrt(6) = 2.45 times the default's where fan_in = fan_out. Batch
    norm starts at weight 1, bias 0 with both."""
    default, kaiming = build_backbone(arch, 3, 16, "default"), build_backbone(arch, 3, 16, "kaiming")
    for weight in conv_weights(default):
        bound = weight[0].numel() ** -0.5
        assert weight.abs().max() <= bound
        if weight.numel() >= 4096:
            assert abs(weight.std().item() / (bound / 3 ** 0.5) - 1) < 0.05
    for weight in conv_weights(kaiming):
        fan_out = weight.shape[0] * weight[0, 0].numel()
        if weight.numel() >= 4096:
            assert abs(weight.std().item() / (2 / fan_out) ** 0.5 - 1) < 0.05
    square = [(d, k) for d, k in zip(conv_weights(default), conv_weights(kaiming))
              if d.shape[0] == d.shape[1] and d.numel() >= 4096]
    assert square and all(abs(k.std() / d.std() - 6 ** 0.5) < 0.15 for d, k in square)
    for model in (default, kaiming):
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                assert (m.weight == 1).all() and (m.bias == 0).all()


@pytest.mark.parametrize("arch", ["resnet18_cifar", "resnet18_sobel", "alexnet_bn"])
def test_init_legacy_is_default_with_batch_norm_weights_uniform(arch):
    """`--init legacy` (PyTorch before 1.2, which NPID's 0.4 and EmbedUL's 1.1.0 ran): the convolutions of `default`
    drawn from the same generator, then every batch-norm weight U(0, 1) (bias 0)."""
    torch.manual_seed(0)
    default = build_backbone(arch, 3, 16, "default")
    torch.manual_seed(0)
    legacy = build_backbone(arch, 3, 16, "legacy")
    assert all(torch.equal(a, b) for a, b in zip(conv_weights(default), conv_weights(legacy)))
    norms = [m for m in legacy.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    weights = torch.cat([m.weight.detach() for m in norms])
    assert norms and all((m.bias == 0).all() for m in norms)
    assert weights.min() >= 0 and weights.max() < 1 and abs(weights.mean().item() - 0.5) < 0.05
    assert abs(weights.std().item() - 12 ** -0.5) < 0.02


def test_methods_default_init():
    """By default NPID, Super-AND and EmbedUL start from PyTorch's default init (their recipes choose today's or the
    legacy one of their upstream's PyTorch), the other methods from kaiming-normal."""
    from conftest import entry_module

    pretrain, cluster = entry_module("main_pretrain"), entry_module("main_cluster")
    for method, parse in (("npid", pretrain), ("superand", pretrain), ("embedul", cluster), ("swav", pretrain),
                          ("unmix", pretrain), ("sela", cluster), ("selfclassifier", cluster)):
        expected = "default" if method in ("npid", "superand", "embedul") else "kaiming"
        assert parse.parse_args(["--method", method, "--output_dir", "unused"]).init == expected, method


def test_unknown_backbone_or_init_is_refused():
    with pytest.raises(ConfigError, match="--arch"):
        build_backbone("resnet50x", 3, 8)
    with pytest.raises(ConfigError, match="--init"):
        build_backbone("resnet18_cifar", 3, 8, "xavier")


def test_projection_mlp_shapes():
    assert isinstance(projection_mlp(16, 0, 0), nn.Identity)
    linear = projection_mlp(16, 0, 8)
    assert isinstance(linear, nn.Linear) and linear.out_features == 8
    mlp = projection_mlp(16, 32, 8)
    assert [type(m) for m in mlp] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert mlp(torch.randn(5, 16)).shape == (5, 8)


def test_prototypes_normalise_and_score():
    protos = Prototypes(6, 10)
    z = F.normalize(torch.randn(3, 6), dim=1)
    torch.testing.assert_close(protos(z), z @ protos.weight.t())
    protos.normalize_()
    torch.testing.assert_close(protos.weight.norm(dim=1), torch.ones(10))
    scores = protos(z)
    assert scores.abs().max() <= 1 + 1e-6  # cosine similarities
