"""Backbones with FPN (P2-P6, strides 4-64): a tiny one sized for a 2-core CPU, and
torchvision's ResNet-18/50-FPN with optional ImageNet weights (off by default).

Each returns a torchvision ``BackboneWithFPN``-style module: ``forward(Tensor[N, 3, H, W])``
-> ordered dict of 5 maps Tensor[N, C_fpn, H / s, W / s] and an ``out_channels`` attribute.
"""
from __future__ import annotations

from collections import OrderedDict

from torch import nn
from torchvision.models import get_model_weights, resnet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import misc as misc_nn_ops
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

BACKBONES = ("tiny", "resnet18", "resnet50")
FPN_STRIDES = (4, 8, 16, 32, 64)
TINY_WIDTHS = (32, 48, 64, 96)  # channels of C2..C5


def _conv_block(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(8, out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.GroupNorm(8, out_channels),
        nn.ReLU(inplace=True),
    )


def tiny_body(widths: tuple[int, ...] = TINY_WIDTHS) -> nn.Module:
    """A 4-stage conv net: stem (stride 2), then C2..C5 at strides 4, 8, 16, 32."""
    stages = OrderedDict(stem=_conv_block(3, 16, 2))
    in_channels = 16
    for name, width in zip(("c2", "c3", "c4", "c5"), widths):
        stages[name] = _conv_block(in_channels, width, 2)
        in_channels = width
    return nn.Sequential(stages)


def build_backbone(name: str, fpn_channels: int, pretrained: bool = False, trainable_layers: int = 3) -> nn.Module:
    """FPN backbone by name ("tiny", "resnet18", "resnet50"). Pretrained ResNets keep frozen
    batch norm and train ``trainable_layers`` stages; randomly initialised ones train all with
    BatchNorm (as torchvision's detection builders do)."""
    if name == "tiny":
        if pretrained:
            raise ValueError("backbone 'tiny' has no pretrained weights; set pretrained_backbone=False")
        return BackboneWithFPN(
            tiny_body(),
            return_layers={"c2": "0", "c3": "1", "c4": "2", "c5": "3"},
            in_channels_list=list(TINY_WIDTHS),
            out_channels=fpn_channels,
            extra_blocks=LastLevelMaxPool(),
        )
    if name not in BACKBONES:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {name!r}")
    weights = get_model_weights(name).DEFAULT if pretrained else None
    body = getattr(resnet, name)(weights=weights, norm_layer=misc_nn_ops.FrozenBatchNorm2d if pretrained else nn.BatchNorm2d)
    trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][: trainable_layers if pretrained else 5]
    if not pretrained:
        trainable.append("bn1")
    for param_name, param in body.named_parameters():
        param.requires_grad_(any(param_name.startswith(layer) for layer in trainable))
    c2_channels = body.inplanes // 8  # 64 for resnet18, 256 for resnet50
    return BackboneWithFPN(
        body,
        return_layers={f"layer{k}": str(k - 1) for k in range(1, 5)},
        in_channels_list=[c2_channels * 2**k for k in range(4)],
        out_channels=fpn_channels,
        extra_blocks=LastLevelMaxPool(),
    )
