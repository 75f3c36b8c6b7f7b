"""Backbones with FPN: a tiny one sized for a 2-core CPU, and torchvision's ResNet-18/50-FPN
with optional ImageNet weights (off by default). Two level layouts: P2-P6 (strides 4-64, the
RPN / R-CNN layout: C2-C5 and a max-pooled P6) and P3-P7 (strides 8-128, RetinaNet's: C3-C5
and P6, P7 by strided convs from P5).

Each returns a torchvision ``BackboneWithFPN``-style module: ``forward(Tensor[N, 3, H, W])``
-> ordered dict of 5 maps Tensor[N, C_fpn, H / s, W / s] and an ``out_channels`` attribute.
"""
from __future__ import annotations

from collections import OrderedDict

from torch import nn
from torchvision.models import get_model_weights, resnet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import misc as misc_nn_ops
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

BACKBONES = ("tiny", "resnet18", "resnet50")
FPN_STRIDES = (4, 8, 16, 32, 64)  # P2-P6
RETINA_STRIDES = (8, 16, 32, 64, 128)  # P3-P7
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


def build_backbone(name: str, fpn_channels: int, pretrained: bool = False, trainable_layers: int = 3,
                   levels: str = "p2p6") -> nn.Module:
    """FPN backbone by name ("tiny", "resnet18", "resnet50") with ``levels`` "p2p6" (strides
    ``FPN_STRIDES``) or "p3p7" (``RETINA_STRIDES``). Pretrained ResNets keep frozen batch norm and
    train ``trainable_layers`` stages; randomly initialised ones train all with BatchNorm (as
    torchvision's detection builders do). The body's parameter names are the same in both
    layouts (a P2-P6 model's body weights load into a P3-P7 backbone)."""
    if levels not in ("p2p6", "p3p7"):
        raise ValueError(f"levels must be 'p2p6' or 'p3p7', got {levels!r}")
    first = 1 if levels == "p2p6" else 2  # index of the first returned stage among C2..C5

    def extra_blocks() -> nn.Module:
        return LastLevelMaxPool() if levels == "p2p6" else LastLevelP6P7(fpn_channels, fpn_channels)

    if name == "tiny":
        if pretrained:
            raise ValueError("backbone 'tiny' has no pretrained weights; set pretrained_backbone=False")
        return BackboneWithFPN(
            tiny_body(),
            return_layers={f"c{k + 1}": str(k - first) for k in range(first, 5)},
            in_channels_list=list(TINY_WIDTHS[first - 1:]),
            out_channels=fpn_channels,
            extra_blocks=extra_blocks(),
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
        return_layers={f"layer{k}": str(k - first) for k in range(first, 5)},
        in_channels_list=[c2_channels * 2 ** (k - 1) for k in range(first, 5)],
        out_channels=fpn_channels,
        extra_blocks=extra_blocks(),
    )
