"""The pipeline's model variants and their names in tables, plots and titles: the one
definition of each.

Proposers (``train/<v>``, ``proposals/<v>``, ...; the variant is ``ProposerConfig.kind``):

    rpn        the RPN baseline (sliding-window anchors)
    ga_rpn     GA-RPN (guided anchors)

Detectors (paper Tables 2 and 3; ``train_detector/<v>``, ``eval_detector/<v>``):

    fast_rcnn_rpn, fast_rcnn_ga_rpn   Fast R-CNN on the cached proposals of RPN / GA-RPN
    faster_rcnn, ga_faster_rcnn       Faster R-CNN with the RPN baseline / GA-RPN, end to end
    retinanet, ga_retinanet           RetinaNet with dense anchors / guided anchors
    finetune_rpn, finetune_ga_rpn     the trained Faster R-CNN fine-tuned on cached RPN / GA-RPN
                                      proposals (its RPN replaced by them; Table 3)
"""

from __future__ import annotations

PROPOSERS: tuple[str, ...] = ("rpn", "ga_rpn")
PROPOSER_LABELS: dict[str, str] = {"rpn": "RPN", "ga_rpn": "GA-RPN"}

# variant -> (model kind, guided)
DETECTORS: dict[str, tuple[str, bool]] = {
    "fast_rcnn_rpn": ("fast_rcnn", False),
    "fast_rcnn_ga_rpn": ("fast_rcnn", True),
    "faster_rcnn": ("faster_rcnn", False),
    "ga_faster_rcnn": ("faster_rcnn", True),
    "retinanet": ("retinanet", False),
    "ga_retinanet": ("retinanet", True),
}
FINETUNE_BASE = "faster_rcnn"  # the detector the fine-tuning variants start from
DETECTOR_LABELS: dict[str, str] = {
    "fast_rcnn_rpn": "Fast R-CNN (RPN proposals)",
    "fast_rcnn_ga_rpn": "GA-Fast R-CNN (GA-RPN proposals)",
    "faster_rcnn": "Faster R-CNN",
    "ga_faster_rcnn": "GA-Faster R-CNN",
    "retinanet": "RetinaNet",
    "ga_retinanet": "GA-RetinaNet",
    "finetune_rpn": "Faster R-CNN + fine-tune on RPN proposals",
    "finetune_ga_rpn": "Faster R-CNN + fine-tune on GA-RPN proposals",
}


def proposal_source(variant: str) -> str | None:
    """The proposer variant whose cached proposals a detector variant reads (None: none)."""
    if variant.startswith("finetune_"):
        return variant.removeprefix("finetune_")
    kind, guided = DETECTORS[variant]
    return ("ga_rpn" if guided else "rpn") if kind == "fast_rcnn" else None
