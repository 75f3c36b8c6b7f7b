"""Fast R-CNN on precomputed proposals (the paper's GA-Fast R-CNN, Table 2 and 7): an
RPN-contract module serving each image's proposals computed earlier by RPN or GA-RPN, installed
as ``FasterRCNN(...).rpn``.

torchvision's detector does not tell its RPN which image is which, so the proposals travel with
the images: ``FastRCNN.forward(images, targets, proposals=...)`` hands the batch's proposals (xyxy
boxes in each image's original pixels, with scores) to its ``PrecomputedProposals`` before
torchvision's forward runs. The module maps them into the resized image exactly as the
transform maps ground-truth boxes (one scale per axis), keeps the ``top_n`` highest-scoring ones
and returns them in the RPN contract ``(per image Tensor[P_i, 4], {})``: no RPN losses.

Shape shorthand: N images; K_i given proposals of image i; P_i = min(K_i, top_n) returned.
"""
from __future__ import annotations

from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.image_list import ImageList


class PrecomputedProposals(nn.Module):
    """The RPN of a Fast R-CNN: returns the proposals given with the batch (see module docstring).

    Args:
        top_n_train, top_n_test: proposals kept per image, highest score first (the paper's
            GA-Fast R-CNN: 300 at train and test; RPN's standard: 2000 / 1000).
    """

    def __init__(self, top_n_train: int = 2000, top_n_test: int = 1000) -> None:
        super().__init__()
        if top_n_train < 1 or top_n_test < 1:
            raise ValueError(f"top_n_train and top_n_test must be >= 1, got {top_n_train}, {top_n_test}")
        self.top_n_train, self.top_n_test = top_n_train, top_n_test
        self._batch: tuple[list[dict[str, Tensor]], list[tuple[int, int]]] | None = None

    def set_batch(self, proposals: list[dict[str, Tensor]], original_sizes: list[tuple[int, int]]) -> None:
        """The next ``forward``'s proposals: per image dict(boxes=Tensor[K_i, 4] xyxy in the original
        image's pixels, scores=Tensor[K_i]), and the original (h, w) of each image."""
        if len(proposals) != len(original_sizes):
            raise ValueError(f"got proposals for {len(proposals)} images, but {len(original_sizes)} images")
        for i, p in enumerate(proposals):
            boxes, scores = p.get("boxes"), p.get("scores")
            if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
                raise ValueError(f"proposals[{i}]['boxes'] must be a Tensor[K, 4], got {getattr(boxes, 'shape', boxes)!r}")
            if not isinstance(scores, Tensor) or scores.shape != boxes.shape[:1]:
                raise ValueError(f"proposals[{i}]['scores'] must be a Tensor[{boxes.shape[0]}], got {getattr(scores, 'shape', scores)!r}")
        self._batch = (proposals, original_sizes)

    def forward(
        self, images: ImageList, features: dict[str, Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """Per image the top-n proposals, Tensor[P_i, 4] in ``images``' (resized) pixels; no losses."""
        if self._batch is None:
            raise RuntimeError("PrecomputedProposals has no proposals for this batch: call it through "
                               "FastRCNN(images, targets, proposals=...) or set_batch() first")
        proposals, original_sizes = self._batch
        self.clear()
        if len(proposals) != len(images.image_sizes):
            raise ValueError(f"got proposals for {len(proposals)} images, but the batch has {len(images.image_sizes)}")
        top_n = self.top_n_train if self.training else self.top_n_test
        out = []
        for p, (height, width), (orig_h, orig_w) in zip(proposals, images.image_sizes, original_sizes):
            order = p["scores"].argsort(descending=True, stable=True)[:top_n]  # [P_i]
            boxes = p["boxes"][order].to(images.tensors)  # [P_i, 4], the batch's device and dtype
            out.append(boxes * boxes.new_tensor([width / orig_w, height / orig_h, width / orig_w, height / orig_h]))
        return out, {}

    def clear(self) -> None:
        """Forget proposals set but not used (a failed forward must not leave them to the next batch)."""
        self._batch = None


class FastRCNN(FasterRCNN):
    """torchvision's ``FasterRCNN`` whose RPN is ``PrecomputedProposals``.

    ``forward(images, targets=None, proposals=...)``: ``proposals`` per image
    dict(boxes=Tensor[K_i, 4] xyxy original pixels, scores=Tensor[K_i]); otherwise torchvision's
    contract (losses ``loss_classifier``, ``loss_box_reg`` in training; detections in eval, in
    the original images' pixels). ``kwargs`` go to ``FasterRCNN`` (``box_fg_iou_thresh``,
    ``box_batch_size_per_image``, ``min_size``, ...).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, top_n_train: int = 2000, top_n_test: int = 1000, **kwargs) -> None:
        super().__init__(backbone, num_classes, **kwargs)
        self.rpn = PrecomputedProposals(top_n_train, top_n_test)

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None,
                proposals: list[dict[str, Tensor]] | None = None):
        if proposals is None:
            raise ValueError("FastRCNN needs proposals=[dict(boxes=Tensor[K, 4], scores=Tensor[K]) per image]")
        self.rpn.set_batch(proposals, [tuple(image.shape[-2:]) for image in images])
        try:
            return super().forward(images, targets)
        finally:
            self.rpn.clear()
