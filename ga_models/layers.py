"""Layers of Guided Anchoring: feature adaption (paper Sec. 3.3) and masked convolution
(sparse inference at the locations the location branch keeps, Sec. 3.5).

Shape shorthand: N images, C / O input / output channels, H x W map, P active positions,
G deform groups, k kernel size, kk = k * k kernel points.

Masked computation works for any batch size: the active positions of all images are
gathered together, so one matmul serves the whole batch.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import deform_conv2d

# Active positions are processed in chunks so the gathered columns stay a few hundred MB at most.
_CHUNK = 8192


def _active_positions(mask: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Indices (n, i, j), each Tensor[P], of the True entries of mask Tensor[N, H, W] matching x."""
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got {mask.dtype}")
    if mask.shape != (x.shape[0], x.shape[2], x.shape[3]):
        raise ValueError(f"mask must have shape [N, H, W] = {[x.shape[0], *x.shape[2:]]}, got {list(mask.shape)}")
    return mask.nonzero(as_tuple=True)


def _kernel_grid(kernel_size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Row and column offsets of the kernel points, Tensor[kk] each, point index = row * k + col."""
    rows, cols = torch.meshgrid(torch.arange(kernel_size, device=device), torch.arange(kernel_size, device=device), indexing="ij")
    return rows.reshape(-1), cols.reshape(-1)


def conv_at_positions(x: Tensor, n: Tensor, i: Tensor, j: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """A stride-1 'same' convolution evaluated only at positions (n, i, j): Tensor[P, O].

    x: Tensor[N, C, H, W]; weight: Tensor[O, C, k, k] with odd k. The k x k neighbourhoods of
    the positions are gathered from the zero-padded map (channels last) and multiplied with
    the flattened weight in one matmul.
    """
    out_channels, in_channels, kernel_size, _ = weight.shape
    pad = kernel_size // 2
    padded = F.pad(x, (pad, pad, pad, pad)) if pad else x
    channels_last = padded.permute(0, 2, 3, 1)  # [N, H + 2p, W + 2p, C]
    rows, cols = _kernel_grid(kernel_size, x.device)
    flat_weight = weight.reshape(out_channels, in_channels * kernel_size * kernel_size)
    outputs = []
    for start in range(0, n.numel(), _CHUNK):
        sl = slice(start, start + _CHUNK)
        patch = channels_last[n[sl, None], i[sl, None] + rows, j[sl, None] + cols]  # [P, kk, C]
        columns = patch.permute(0, 2, 1).reshape(patch.shape[0], -1)  # [P, C * kk], index c * kk + point
        outputs.append(columns @ flat_weight.t())  # [P, O]
    out = torch.cat(outputs) if outputs else x.new_zeros((0, out_channels))
    return out + bias if bias is not None else out


def scatter_positions(values: Tensor, n: Tensor, i: Tensor, j: Tensor, like: Tensor) -> Tensor:
    """Dense map Tensor[N, O, H, W] holding values Tensor[P, O] at (n, i, j) and 0 elsewhere."""
    out = like.new_zeros((like.shape[0], values.shape[1], like.shape[2], like.shape[3]))
    out[n, :, i, j] = values.to(out.dtype)
    return out


class MaskedConv2d(nn.Conv2d):
    """Conv2d (stride 1, 'same' padding, odd kernel) that, in eval mode with a mask, computes
    only the active positions and returns 0 elsewhere; dense (plain Conv2d) in training or
    without a mask. Exactly equal to the dense conv at the active positions, any batch size.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, bias: bool = True) -> None:
        if kernel_size % 2 != 1:
            raise ValueError(f"MaskedConv2d needs an odd kernel_size, got {kernel_size}")
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x: Tensor[N, C, H, W]; mask: Tensor[N, H, W] bool or None. Returns Tensor[N, O, H, W]."""
        if mask is None or self.training:
            return super().forward(x)
        n, i, j = _active_positions(mask, x)
        return scatter_positions(conv_at_positions(x, n, i, j, self.weight, self.bias), n, i, j, x)


def deform_conv_at_positions(x: Tensor, offset: Tensor, n: Tensor, i: Tensor, j: Tensor, weight: Tensor) -> Tensor:
    """DCNv1 (stride 1, 'same' padding, no bias) evaluated only at positions (n, i, j): Tensor[P, O].

    x: Tensor[N, C, H, W]; offset: Tensor[P, G * 2 * kk] in torchvision's layout ((dy, dx) per
    kernel point, point index = row * k + col, groups contiguous); weight: Tensor[O, C, k, k];
    (n, i, j) sorted by n, as ``nonzero`` returns them. The kk sampling points of every position
    go through one bilinear ``grid_sample`` per image and group (images padded to the largest
    count P_max), then one matmul per image on the samples as they come out, [C * kk, P_max]
    (gathering the kept outputs, not the 9x larger columns). Samples outside the map are 0, as
    in deform_conv2d.
    """
    batch, channels, height, width = x.shape
    out_channels, _, kernel_size, _ = weight.shape
    kk = kernel_size * kernel_size
    groups = offset.shape[1] // (2 * kk)
    num = n.numel()
    if num == 0:
        return x.new_zeros((0, out_channels))
    counts = torch.bincount(n, minlength=batch)  # [N]
    rank = torch.arange(num, device=x.device) - (counts.cumsum(0) - counts)[n]  # index within its image
    rows, cols = _kernel_grid(kernel_size, x.device)
    pad = kernel_size // 2
    delta = offset.view(num, groups, kk, 2)
    grid = _sampling_grid(delta[..., 0], delta[..., 1], (i[:, None] + rows - pad)[:, None], (j[:, None] + cols - pad)[:, None],
                          height, width)  # [P, G, kk, 2]
    padded = grid.new_zeros((batch, int(counts.max()), groups, kk, 2))
    padded[n, rank] = grid
    sampled = F.grid_sample(
        x.reshape(batch * groups, channels // groups, height, width),
        padded.permute(0, 2, 3, 1, 4).reshape(batch * groups, kk, -1, 2),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )  # [N * G, C / G, kk, P_max]
    out = weight.reshape(out_channels, channels * kk) @ sampled.view(batch, channels * kk, -1)  # [N, O, P_max]
    return out.transpose(1, 2)[n, rank]


def _sampling_grid(dy: Tensor, dx: Tensor, ys: Tensor, xs: Tensor, height: int, width: int) -> Tensor:
    """grid_sample coordinates (align_corners=False) of kernel points at rows ys + dy, columns
    xs + dx of a height x width map; ys, xs (integer tensors) broadcast against dy, dx.
    Returns Tensor[*dy.shape, 2] as (x, y), in [-1, 1] for in-map samples."""
    base_x = (xs.to(dx.dtype) + 0.5) * (2 / width) - 1  # the integer part once, the offsets in one pass each
    base_y = (ys.to(dy.dtype) + 0.5) * (2 / height) - 1
    return torch.stack([base_x + dx * (2 / width), base_y + dy * (2 / height)], dim=-1)


@functools.lru_cache(maxsize=64)
def _base_grid(height: int, width: int, kernel_size: int, device: torch.device) -> Tensor:
    """grid_sample coordinates of the undeformed kernel points of every position of a height x
    width map: Tensor[kk, 2, H * W] as (x, y) rows, positions innermost (what the dense grids
    are built in: one vectorised pass per term). Cached per map size (building it cost ~1.5 ms
    per image over five levels, a tenth of the deformable conv): shared, never modify it in place."""
    rows, cols = _kernel_grid(kernel_size, device)
    position = torch.arange(height * width, device=device)
    pad = kernel_size // 2
    ys = position // width + (rows - pad)[:, None]  # [kk, HW]
    xs = position % width + (cols - pad)[:, None]
    zero = torch.zeros((), device=device)
    return _sampling_grid(zero, zero, ys, xs, height, width).transpose(1, 2).contiguous()


def offset_grid(offset: Tensor, kernel_size: int) -> Tensor:
    """grid_sample coordinates (align_corners=False) of a stride-1 'same' deformable conv's kernel
    points: Tensor[N, G, kk, H * W, 2] as (x, y) (a transposed view: grid_sample reads it in place),
    from offset Tensor[N, G * 2 * kk, H, W] in torchvision's layout ((dy, dx) per kernel point,
    point index = row * k + col)."""
    batch, _, height, width = offset.shape
    kk = kernel_size * kernel_size
    delta = offset.view(batch, -1, kk, 2, height * width).flip(3)  # [N, G, kk, (dx, dy), HW]
    scale = offset.new_tensor([2 / width, 2 / height])[:, None]  # pixels -> grid units
    return torch.addcmul(_base_grid(height, width, kernel_size, offset.device), delta, scale).transpose(3, 4)


def shape_guided_grid(shape_pred: Tensor, offset_weight: Tensor, kernel_size: int) -> Tensor:
    """``offset_grid`` of the offsets a bias-free 1x1 conv makes from the shape prediction, without
    the offset map: the offsets are linear in the C_s shape channels, so the grid is the undeformed
    kernel grid plus one multiply-add per shape channel (the offset conv, the (dy, dx) -> (x, y)
    swap and the rescaling fold into G x kk x 2 x C_s coefficients).

    shape_pred: Tensor[N, C_s, H, W]; offset_weight: Tensor[G * 2 * kk, C_s, 1, 1].
    Returns Tensor[N, G, kk, H * W, 2] (a transposed view, as ``offset_grid``'s).
    """
    batch, shape_channels, height, width = shape_pred.shape
    kk = kernel_size * kernel_size
    coef = offset_weight.view(-1, kk, 2, shape_channels).flip(2)  # [G, kk, (dx, dy), C_s]
    coef = coef * shape_pred.new_tensor([2 / width, 2 / height])[:, None]  # in grid units
    source = shape_pred.reshape(batch, shape_channels, 1, 1, 1, height * width)
    grid = torch.addcmul(_base_grid(height, width, kernel_size, shape_pred.device), coef[..., 0, None], source[:, 0])
    for channel in range(1, shape_channels):  # grid: [N, G, kk, 2, HW]
        grid = grid.addcmul_(coef[..., channel, None], source[:, channel])
    return grid.transpose(3, 4)


def deform_conv_from_grid(x: Tensor, grid: Tensor, weight: Tensor) -> Tensor:
    """Dense DCNv1 (stride 1, 'same' padding, no bias) as one bilinear ``grid_sample`` of every
    kernel point and group, then one matmul per image. Same values and gradients as
    torchvision.ops.deform_conv2d, whose CPU kernel is serial: forward + backward at
    2 x 64 x 64 x 64, one thread, 0.14 s vs 0.66 s. The samples come out as [C, kk, H * W], the
    column layout the matmul takes, so nothing is transposed; the matmul costs what a plain 3x3
    conv does, the sampling about as much again (2-core CPU, 64 x 64 x 64: 4.5 + 5 ms vs 4 ms).

    x: Tensor[N, C, H, W]; grid: Tensor[N, G, kk, H * W, 2] (``offset_grid``, ``shape_guided_grid``);
    weight: Tensor[O, C, k, k]. Returns Tensor[N, O, H, W].
    """
    batch, channels, height, width = x.shape
    out_channels = weight.shape[0]
    _, groups, kk, _, _ = grid.shape
    sampled = F.grid_sample(
        x.reshape(batch * groups, channels // groups, height, width),
        grid.reshape(batch * groups, kk, height * width, 2),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )  # [N * G, C / G, kk, HW]
    columns = sampled.view(batch, channels * kk, height * width)  # index c * kk + point
    flat_weight = weight.reshape(out_channels, channels * kk)
    out = torch.stack([flat_weight.mm(image) for image in columns])  # [N, O, HW]: mm, not the broadcast bmm (~20% slower)
    return out.view(batch, out_channels, height, width)


def deform_conv_grid_sample(x: Tensor, offset: Tensor, weight: Tensor) -> Tensor:
    """``deform_conv_from_grid`` with offsets Tensor[N, G * 2 * kk, H, W] in torchvision's layout:
    a drop-in for deform_conv2d(x, offset, weight, padding=k // 2) on CPU. Returns Tensor[N, O, H, W]."""
    return deform_conv_from_grid(x, offset_grid(offset, weight.shape[-1]), weight)


class FeatureAdaption(nn.Module):
    """Feature adaption N_T: a 3x3 deformable conv (DCNv1, no bias, ``deform_groups`` groups)
    whose offsets come from a 1x1 conv on the *detached* shape prediction, then ReLU.

    offset_source="shape" is the paper's shape-guided adaption; "features" is the plain
    deformable conv of the paper's comparison (offsets from a 3x3 conv on the features).
    With a mask in eval mode only the active positions are computed (0 elsewhere). Dense
    calls use torchvision.ops.deform_conv2d on CUDA and ``deform_conv_from_grid`` on CPU (with
    the shape-guided offsets folded into the grid, ``shape_guided_grid``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        shape_channels: int = 2,
        kernel_size: int = 3,
        deform_groups: int = 4,
        offset_source: str = "shape",
    ) -> None:
        super().__init__()
        if offset_source not in ("shape", "features"):
            raise ValueError(f"offset_source must be 'shape' or 'features', got {offset_source!r}")
        if in_channels % deform_groups:
            raise ValueError(f"in_channels={in_channels} is not divisible by deform_groups={deform_groups}")
        self.offset_source = offset_source
        offset_channels = deform_groups * 2 * kernel_size * kernel_size
        if offset_source == "shape":
            self.conv_offset = MaskedConv2d(shape_channels, offset_channels, 1, bias=False)
            nn.init.normal_(self.conv_offset.weight, std=0.1)
        else:
            self.conv_offset = MaskedConv2d(in_channels, offset_channels, 3, bias=True)
            nn.init.zeros_(self.conv_offset.weight)
            nn.init.zeros_(self.conv_offset.bias)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        nn.init.normal_(self.weight, std=0.01)

    def forward(self, x: Tensor, shape_pred: Tensor | None, mask: Tensor | None = None) -> Tensor:
        """x: Tensor[N, C, H, W]; shape_pred: Tensor[N, 2 or 4, H, W] (unused, may be None, with
        offset_source="features"); mask: Tensor[N, H, W] bool or None. Returns Tensor[N, O, H, W]."""
        if self.offset_source == "shape" and shape_pred is None:
            raise ValueError("shape-guided feature adaption needs the shape prediction")
        source = shape_pred.detach() if self.offset_source == "shape" else x
        if (mask is None or self.training) and x.is_cuda:
            offset = self.conv_offset(source)
            pad = self.weight.shape[-1] // 2
            return F.relu(deform_conv2d(x, offset, self.weight, padding=(pad, pad)), inplace=True)
        if mask is None or self.training:
            kernel_size = self.weight.shape[-1]
            if self.offset_source == "shape":
                grid = shape_guided_grid(source, self.conv_offset.weight, kernel_size)
            else:
                grid = offset_grid(self.conv_offset(source), kernel_size)
            return F.relu(deform_conv_from_grid(x, grid, self.weight), inplace=True)
        n, i, j = _active_positions(mask, x)
        offset = conv_at_positions(source, n, i, j, self.conv_offset.weight, self.conv_offset.bias)  # [P, G*2*kk]
        values = F.relu(deform_conv_at_positions(x, offset, n, i, j, self.weight), inplace=True)  # [P, O]
        return scatter_positions(values, n, i, j, x)
