"""RoIAlign on CPU as a weighted gather, for the R-CNN box heads.

Why: torchvision's CPU ``roi_align`` kernel is serial and its backward scatters one sample and
one channel at a time; in a Fast R-CNN training step of the ``default`` preset (4 images, 2,000
proposals each, 512 RoIs sampled per image) its backward alone was 47% of the step
(``benchmarks/bench_train_step.py``). Written as a gather, every bin's value is a weighted sum of
``4 s^2`` feature rows (s x s bilinear samples, 4 neighbours each) of the channels-last map:
``embedding_bag(mode="sum", per_sample_weights=...)`` computes it, and the backward is the
transposed sparse matrix (map rows x bins, the same weights) times the bins' gradients, one
``torch.sparse.mm`` over all channels at once (``embedding_bag``'s own backward sorts the 4 s^2
R P_h P_w indices first: 2x slower). One thread, 64 channels, 7 x 7 bins, s = 2, 64 x 64 map,
2,048 RoIs: forward 23 ms, backward 72 ms (``embedding_bag``'s 188 ms); a Fast R-CNN training
step with it takes 0.61x the time it takes with torchvision's op. Values and gradients equal
torchvision's to float rounding (tested, including boxes partly or wholly outside the map and
``aligned`` both ways).
As torchvision's op, no gradient reaches the boxes. On CUDA torchvision's kernel is used.

Shape shorthand: N images, C channels, H x W map, R RoIs, P_h x P_w bins (output_size), s samples
per bin side (sampling_ratio), B = R P_h P_w bins, E = 4 s^2 entries per bin.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import roi_align as torchvision_roi_align
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales


def _axis_samples(start: Tensor, length: Tensor, size: int, bins: int, samples: int, aligned: bool) -> tuple[Tensor, Tensor]:
    """Bilinear sampling along one axis, as torchvision's RoIAlign does it: per RoI the ``bins * samples``
    sample coordinates ``start + (b + (k + 0.5) / samples) * length / bins``, each with its two
    neighbouring cells and weights. A coordinate outside [-1, size] weighs 0; one in [-1, 0] is
    taken at 0, one past the last cell at the last cell (torchvision's ``bilinear_interpolate``).

    start, length: Tensor[R] in map cells (RoI start and extent). Returns (cells int64[R, B * s, 2],
    weights Tensor[R, B * s, 2]) for the (low, high) neighbours."""
    if not aligned:
        length = length.clamp(min=1.0)  # torchvision: a RoI at least one cell wide, unaligned only
    steps = (torch.arange(bins * samples, dtype=start.dtype, device=start.device) + 0.5) / samples  # [B * s] in bins
    coord = start[:, None] + steps * (length / bins)[:, None]  # [R, B * s]
    inside = (coord >= -1.0) & (coord <= size)
    coord = coord.clamp(min=0.0)
    low = coord.floor().long()
    at_end = low >= size - 1
    low = torch.where(at_end, size - 1, low)
    high = torch.where(at_end, size - 1, low + 1)
    frac = torch.where(at_end, torch.zeros_like(coord), coord - low.to(coord.dtype))  # [R, B * s]
    weights = torch.stack([1 - frac, frac], dim=-1) * inside[..., None].to(coord.dtype)  # [R, B * s, 2]
    return torch.stack([low, high], dim=-1), weights


class _WeightedGather(torch.autograd.Function):
    """out[b] = sum over the E entries e of bin b of weight[b, e] * table[index[b, e]]: Tensor[B, C],
    from table Tensor[M, C], index int64[B * E] and weight Tensor[B * E] (bins' entries contiguous).
    Differentiable in table only (the weights come from boxes, which get no gradient)."""

    @staticmethod
    def forward(ctx, table: Tensor, index: Tensor, weight: Tensor, per_bin: int) -> Tensor:
        ctx.save_for_backward(index, weight)
        ctx.rows, ctx.per_bin = table.shape[0], per_bin
        offsets = torch.arange(0, index.numel(), per_bin, device=index.device)
        return F.embedding_bag(index, table, offsets, mode="sum", per_sample_weights=weight)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        index, weight = ctx.saved_tensors
        bins = grad.shape[0]
        bin_of_entry = torch.arange(bins, device=grad.device)[:, None].expand(bins, ctx.per_bin).reshape(-1)
        transposed = torch.sparse_coo_tensor(torch.stack([index, bin_of_entry]), weight.to(grad.dtype), (ctx.rows, bins),
                                             check_invariants=False)  # [M, B], uncoalesced: sparse.mm needs no sort
        return torch.sparse.mm(transposed, grad.contiguous()), None, None, None


def roi_align(x: Tensor, rois: Tensor, output_size: tuple[int, int], spatial_scale: float, sampling_ratio: int,
              aligned: bool = False) -> Tensor:
    """torchvision.ops.roi_align for rois Tensor[R, 5] (batch index, x1, y1, x2, y2 in image pixels)
    on x Tensor[N, C, H, W]: Tensor[R, C, P_h, P_w]. CPU with ``sampling_ratio > 0``: the weighted
    gather of the module docstring; otherwise torchvision's kernel."""
    if x.is_cuda or sampling_ratio <= 0:
        return torchvision_roi_align(x, rois, output_size, spatial_scale, sampling_ratio, aligned)
    num_images, channels, height, width = x.shape
    bins_h, bins_w = output_size
    s = sampling_ratio
    num_rois = rois.shape[0]
    offset = 0.5 if aligned else 0.0
    boxes = rois[:, 1:].to(x.dtype) * spatial_scale - offset  # [R, 4] in map cells
    rows, row_w = _axis_samples(boxes[:, 1], boxes[:, 3] - boxes[:, 1], height, bins_h, s, aligned)  # [R, P_h * s, 2]
    cols, col_w = _axis_samples(boxes[:, 0], boxes[:, 2] - boxes[:, 0], width, bins_w, s, aligned)  # [R, P_w * s, 2]
    rows, row_w = rows.view(num_rois, bins_h, 1, s, 2, 1, 1), row_w.view(num_rois, bins_h, 1, s, 2, 1, 1)
    cols, col_w = cols.view(num_rois, 1, bins_w, 1, 1, s, 2), col_w.view(num_rois, 1, bins_w, 1, 1, s, 2)
    image = rois[:, 0].long().view(num_rois, 1, 1, 1, 1, 1, 1)
    # per bin (r, p_h, p_w) its 4 s^2 entries (row sample, row neighbour, column sample, column neighbour)
    index = (image * height + rows) * width + cols  # [R, P_h, P_w, s, 2, s, 2]
    weight = row_w * col_w / (s * s)  # the mean over the s x s samples
    table = x.permute(0, 2, 3, 1).reshape(num_images * height * width, channels)  # [N * H * W, C] channels last
    out = _WeightedGather.apply(table, index.reshape(-1), weight.reshape(-1).detach(), 4 * s * s)  # [R * P_h * P_w, C]
    return out.view(num_rois, bins_h, bins_w, channels).permute(0, 3, 1, 2)


class GatherRoIAlign(MultiScaleRoIAlign):
    """torchvision's MultiScaleRoIAlign (the same level mapping, scales and arguments) pooling with
    ``roi_align`` above; install as ``box_roi_pool`` of a FasterRCNN."""

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        """x: feature maps by name, Tensor[N, C, H_l, W_l]; boxes: per image Tensor[R_i, 4] xyxy in
        the images' pixels. Returns Tensor[sum R_i, C, P_h, P_w] in the boxes' order."""
        maps = _filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(maps, image_shapes, self.canonical_scale, self.canonical_level)
        rois = _convert_to_roi_format(boxes)  # [R, 5]
        if len(maps) == 1:
            return roi_align(maps[0], rois, self.output_size, self.scales[0], self.sampling_ratio)
        levels = self.map_levels(boxes)  # [R]
        out = maps[0].new_zeros((len(rois), maps[0].shape[1], *self.output_size))
        for level, (feature, scale) in enumerate(zip(maps, self.scales)):
            at_level = torch.where(levels == level)[0]
            out[at_level] = roi_align(feature, rois[at_level], self.output_size, scale, self.sampling_ratio).to(out.dtype)
        return out
