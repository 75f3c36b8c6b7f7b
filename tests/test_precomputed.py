"""Fast R-CNN on precomputed proposals: the RPN-contract module returns exactly the given boxes,
mapped to the resized image, in score order, top-n (train and test); FastRCNN trains a step and
evaluates with torchvision's loss keys and outputs."""

import pytest
import torch
from torchvision.models.detection.image_list import ImageList

from ga_models import FastRCNN, PrecomputedProposals
from ga_models.backbones import build_backbone

# Image 0: original 64 x 128 (h x w), resized to 128 x 256 (x2 per axis).
# Image 1: original 100 x 100, resized to 50 x 75 (a non-uniform resize, to check the per-axis scale).
SIZES = [(64, 128), (100, 100)]
RESIZED = [(128, 256), (50, 75)]
PROPOSALS = [
    {"boxes": torch.tensor([[0.0, 0.0, 32.0, 32.0], [10.0, 20.0, 30.0, 40.0], [1.0, 2.0, 3.0, 4.0]]),
     "scores": torch.tensor([0.2, 0.9, 0.5])},
    {"boxes": torch.tensor([[0.0, 0.0, 100.0, 100.0], [50.0, 50.0, 60.0, 80.0]]),
     "scores": torch.tensor([0.1, 0.3])},
]


def served(module, training):
    module.train(training)
    module.set_batch(PROPOSALS, SIZES)
    images = ImageList(torch.zeros(2, 3, 128, 256), RESIZED)
    boxes, losses = module(images, {"0": torch.zeros(2, 4, 8, 8)})
    assert losses == {}
    return boxes


def test_boxes_are_scaled_to_the_resized_image_in_score_order():
    boxes = served(PrecomputedProposals(top_n_train=10, top_n_test=10), training=False)
    # image 0, scores 0.9 > 0.5 > 0.2, each coordinate x2
    assert torch.equal(boxes[0], torch.tensor([[20.0, 40.0, 60.0, 80.0], [2.0, 4.0, 6.0, 8.0], [0.0, 0.0, 64.0, 64.0]]))
    # image 1, x * 0.75 and y * 0.5, scores 0.3 > 0.1
    assert torch.equal(boxes[1], torch.tensor([[37.5, 25.0, 45.0, 40.0], [0.0, 0.0, 75.0, 50.0]]))


def test_top_n_differs_between_training_and_test():
    module = PrecomputedProposals(top_n_train=2, top_n_test=1)
    train, test = served(module, training=True), served(module, training=False)
    assert [len(b) for b in train] == [2, 2] and [len(b) for b in test] == [1, 1]
    assert torch.equal(test[0], torch.tensor([[20.0, 40.0, 60.0, 80.0]]))  # the best-scoring one


def test_a_batch_is_served_once_and_bad_input_is_named():
    module = PrecomputedProposals()
    served(module, training=False)
    with pytest.raises(RuntimeError, match="no proposals for this batch"):
        module(ImageList(torch.zeros(2, 3, 8, 8), RESIZED), {})
    with pytest.raises(ValueError, match="proposals for 1 images, but 2 images"):
        module.set_batch(PROPOSALS[:1], SIZES)
    with pytest.raises(ValueError, match=r"proposals\[1\]\['scores'\] must be a Tensor\[2\]"):
        module.set_batch([PROPOSALS[0], {"boxes": PROPOSALS[1]["boxes"], "scores": torch.zeros(3)}], SIZES)
    with pytest.raises(ValueError, match="top_n_train and top_n_test must be >= 1"):
        PrecomputedProposals(top_n_train=0)


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    return FastRCNN(build_backbone("tiny", 16), num_classes=3, top_n_train=50, top_n_test=20, min_size=64, max_size=64)


def test_fast_rcnn_trains_a_step_and_evaluates(detector):
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 64)]
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 40.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[10.0, 5.0, 50.0, 20.0]]), "labels": torch.tensor([2])}]
    proposals = [{"boxes": torch.tensor([[5.0, 5.0, 30.0, 38.0], [0.0, 0.0, 60.0, 60.0]]), "scores": torch.tensor([0.9, 0.4])},
                 {"boxes": torch.tensor([[12.0, 4.0, 48.0, 22.0]]), "scores": torch.tensor([0.8])}]
    losses = detector.train()(images, targets, proposals=proposals)
    assert set(losses) == {"loss_classifier", "loss_box_reg"}  # torchvision's R-CNN losses, no RPN losses
    sum(losses.values()).backward()
    assert detector.roi_heads.box_predictor.cls_score.weight.grad is not None
    assert detector.rpn._batch is None  # served and forgotten

    out = detector.eval()(images, proposals=proposals)
    assert len(out) == 2 and set(out[0]) == {"boxes", "scores", "labels"}
    for result, image in zip(out, images):
        assert (result["boxes"][:, 2] <= image.shape[-1]).all() and (result["boxes"][:, 3] <= image.shape[-2]).all()


def test_fast_rcnn_without_proposals_says_what_it_needs(detector):
    with pytest.raises(ValueError, match="FastRCNN needs proposals="):
        detector.eval()([torch.rand(3, 64, 64)])
