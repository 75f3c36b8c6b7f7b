"""The paper's numbers (COCO, ResNet-50-FPN; the team's ``shared/docs/ga-reference.md``), in one place for the
report and the sweeps. Recall and AP in percent; metric names as the pipeline logs them."""

from __future__ import annotations

from stages.common.metrics import PROPOSAL_STATS

AR_COLUMNS = PROPOSAL_STATS  # the columns of the paper's AR tables


def _ar(*values: float) -> dict[str, float]:
    """AR_100, AR_300, AR_1000 (then AR_S, AR_M, AR_L when given)."""
    return dict(zip(AR_COLUMNS, values))


# Table 1 (COCO val); s/img on the authors' GPU.
TABLE1: dict[str, dict[str, float]] = {
    "RPN": {**_ar(47.5, 54.7, 59.4, 31.7, 55.1, 64.6), "seconds_per_image": 0.09},
    "RPN + 9 anchors": {**_ar(46.8, 54.6, 60.3, 29.5, 54.9, 65.6), "seconds_per_image": 0.09},
    "GA-RPN": {**_ar(59.2, 65.2, 68.5, 40.9, 67.8, 79.0), "seconds_per_image": 0.13},
}
# Table 2 (COCO test-dev AP) by detector variant.
TABLE2: dict[str, float] = {
    "fast_rcnn_rpn": 37.1, "fast_rcnn_ga_rpn": 39.4,
    "faster_rcnn": 37.1, "ga_faster_rcnn": 39.8,
    "retinanet": 35.9, "ga_retinanet": 37.1,
}
# Table 2's (baseline, guided) pairs.
TABLE2_PAIRS = (("fast_rcnn_rpn", "fast_rcnn_ga_rpn"), ("faster_rcnn", "ga_faster_rcnn"), ("retinanet", "ga_retinanet"))
# Table 3 (COCO val AP): a trained Faster R-CNN, and it fine-tuned on RPN / GA-RPN proposals.
TABLE3: dict[str, float] = {"faster_rcnn": 37.4, "finetune_rpn": 37.3, "finetune_ga_rpn": 39.6}
# Table 4: the location (L), shape (S) and feature adaption (F.A.) modules; the first row is RPN.
TABLE4: dict[str, dict[str, float]] = {
    "RPN": _ar(47.5, 54.7, 59.4), "L": _ar(48.0, 54.8, 59.5), "S": _ar(53.8, 59.9, 63.6),
    "L+S": _ar(54.0, 60.1, 63.8), "L+S+F.A.": _ar(59.2, 65.2, 68.5),
}
# Table 5: the location threshold eps_L (loc_threshold): anchors per image and recall.
TABLE5: dict[float, dict[str, float]] = {
    0.0: {"anchors_per_image": 75583, **_ar(59.2, 65.2, 68.5)},
    0.01: {"anchors_per_image": 22274, **_ar(59.2, 65.2, 68.5)},
    0.05: {"anchors_per_image": 5251, **_ar(59.1, 65.1, 68.2)},
    0.1: {"anchors_per_image": 2375, **_ar(59.0, 64.7, 67.2)},
}
# Table 6: centre alignment (C.A.) and feature adaption (F.A.); last row: a plain deformable
# convolution in place of the shape-guided adaption.
TABLE6: dict[str, dict[str, float]] = {
    "neither": _ar(51.7, 58.0, 61.6), "C.A.": _ar(54.0, 60.1, 63.8), "F.A.": _ar(57.2, 63.6, 66.8),
    "C.A.+F.A.": _ar(59.2, 65.2, 68.5), "C.A.+deform": _ar(56.1, 62.4, 66.1),
}
# Table 7: Fast R-CNN AP by (proposer, proposals per image, R-CNN IoU threshold).
TABLE7: dict[tuple[str, int, float], float] = {
    ("rpn", 1000, 0.5): 36.7, ("rpn", 1000, 0.6): 37.2, ("rpn", 300, 0.5): 36.1, ("rpn", 300, 0.6): 37.0,
    ("ga_rpn", 1000, 0.5): 37.4, ("ga_rpn", 1000, 0.6): 38.9, ("ga_rpn", 300, 0.5): 37.5, ("ga_rpn", 300, 0.6): 39.4,
}
# Section 4, "Hyper-parameters": AR_1000 by vIoU samples K and by the shape-loss weight lambda2
# (sigma1 in [0.1, 0.5] and sigma2 in [0.2, 1.0] all gave 68.1-68.5, no per-point numbers).
APPROX_SAMPLES: dict[int, dict[str, float]] = {3: {"AR_1000": 68.3}, 9: {"AR_1000": 68.5}, 15: {"AR_1000": 68.5}}
LAMBDA2: dict[float, dict[str, float]] = {
    0.02: {"AR_1000": 68.3}, 0.05: {"AR_1000": 68.4}, 0.1: {"AR_1000": 68.5}, 0.2: {"AR_1000": 68.4},
}
# The paper's setting, for the report's "differs from the paper" line.
SETTING: dict[str, str] = {
    "dataset": "COCO 2017 (train 118k images; val 5k)",
    "backbone": "ResNet-50-FPN from ImageNet weights",
    "image_size": "1333/800",
    "schedule": "12 epochs x 16 images (8 GPUs), lr 0.02, x0.1 at epochs 8 and 11",
    "seeds": "1 run per setting",
    "hardware": "GPU (s/img on one GPU)",
}
