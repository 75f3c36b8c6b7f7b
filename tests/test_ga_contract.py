"""The ga_models side of the stage contract: inputs validated once at the public entry point,
the hooks of ProposalNetworkBase, and the inference-only fields declared on ProposerConfig."""
import sys
from dataclasses import fields

import pytest
import torch
from torchvision.models.detection.image_list import ImageList

from ga_models import HeadOutputs, ProposalNetworkBase, ProposerConfig, build_proposal_network, build_proposer, validation
from ga_models.fields import is_inference_only

BOXES = torch.tensor([[10.0, 20.0, 30.0, 100.0], [50.0, 40.0, 120.0, 56.0]])


@pytest.mark.parametrize("kind", ["rpn", "ga_rpn"])
def test_a_training_step_validates_box_values_once_per_image(kind, monkeypatch):
    calls, original = [], validation.check_box_values

    def spy(boxes, name="boxes"):
        calls.append(name)
        original(boxes, name)

    for module in [m for name, m in sys.modules.items() if name == "ga_models" or name.startswith("ga_models.")]:
        if hasattr(module, "check_box_values"):  # wherever it was imported, the spy replaces it
            monkeypatch.setattr(module, "check_box_values", spy)
    torch.manual_seed(0)
    model = build_proposer(ProposerConfig(kind=kind, min_size=128, max_size=128, fpn_channels=16)).train()
    targets = [{"boxes": BOXES}, {"boxes": torch.zeros(0, 4)}, {"boxes": BOXES[:1]}]
    losses = model([torch.rand(3, 128, 128) for _ in targets], targets)
    sum(losses.values()).backward()
    assert calls == ["targets[0]['boxes']", "targets[1]['boxes']", "targets[2]['boxes']"]


@pytest.mark.parametrize("kind", ["rpn", "ga_rpn"])
def test_the_network_checks_the_structure_of_targets(kind):
    torch.manual_seed(0)
    network = build_proposal_network(ProposerConfig(kind=kind, min_size=128, max_size=128, fpn_channels=16), 16).train()
    features = {str(l): torch.rand(2, 16, 32 >> l, 32 >> l) for l in range(5)}  # P2-P6 of a 128 x 128 input
    images = ImageList(torch.zeros(2, 3, 128, 128), [(128, 128)] * 2)
    with pytest.raises(ValueError, match="got 1 targets for 2 images"):
        network(images, features, [{"boxes": BOXES}])
    with pytest.raises(ValueError, match=r"shape \[K, 4\]"):
        network(images, features, [{"boxes": BOXES}, {"boxes": BOXES[0]}])


def test_a_network_without_predict_says_what_to_implement():
    class NoHook(ProposalNetworkBase):
        pass

    with pytest.raises(TypeError, match=r"abstract.*predict"):
        NoHook(None, torch.nn.Identity())

    class OnlyHook(ProposalNetworkBase):
        def predict(self, images, feature_maps):
            return HeadOutputs([], [], [])

    network = OnlyHook(None, torch.nn.Identity())
    assert network.extra_losses(HeadOutputs([], [], []), []) == {}  # the default: no extra losses


def test_exactly_the_five_inference_fields_carry_the_flag():
    flagged = {f.name for f in fields(ProposerConfig) if is_inference_only(f)}
    assert flagged == {"loc_threshold", "pre_nms_top_n", "post_nms_per_level", "post_nms_top_n", "nms_thresh"}
