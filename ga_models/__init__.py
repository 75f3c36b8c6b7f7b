"""Guided Anchoring (Wang et al., CVPR 2019) as torch modules that plug into torchvision's
detection models. Pure torch/torchvision: no file I/O, no Ray, no MLflow."""
from .ga_rpn import GARPN
from .guidance import AnchorGuidance
from .head import GuidedAnchorHead
from .layers import FeatureAdaption, MaskedConv2d
from .precomputed import FastRCNN, PrecomputedProposals
from .proposals import Proposals
from .proposer import Proposer, ProposerConfig, build_proposal_network, build_proposer, load_state_dict_checked
from .retinanet import GARetinaNet, GARetinaNetHead
from .rpn import HeadOutputs, ProposalNetworkBase, ScoredRPN, build_rpn
from .targets import location_targets, shape_targets

__all__ = [
    "GARPN",
    "AnchorGuidance",
    "FastRCNN",
    "FeatureAdaption",
    "GARetinaNet",
    "GARetinaNetHead",
    "GuidedAnchorHead",
    "HeadOutputs",
    "MaskedConv2d",
    "PrecomputedProposals",
    "ProposalNetworkBase",
    "Proposals",
    "Proposer",
    "ProposerConfig",
    "ScoredRPN",
    "build_proposal_network",
    "build_proposer",
    "build_rpn",
    "load_state_dict_checked",
    "location_targets",
    "shape_targets",
]
