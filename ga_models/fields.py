"""Flags on config dataclass fields (``field(metadata=...)``): what a setting can change. The one
definition of each flag and of the test that reads it; the cache keys (``pipeline.dag``) and
``ProposerConfig.for_kind`` read them through the predicates below.

- ``INFERENCE_ONLY``: read only at inference; changes proposals or detections, not the trained
  weights, so a training node's cache key leaves it out.
- ``NO_EFFECT``: cannot change any output (CPUs reserved, retries, logging): no key holds it.
- ``GA_ONLY`` / ``RPN_ONLY``: read only by GA-RPN / by the RPN baseline; the other kind's config
  carries it at its default, so that sweeping it never re-keys (retrains) the other model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import Field
from types import MappingProxyType

INFERENCE_ONLY: Mapping[str, bool] = MappingProxyType({"inference_only": True})
NO_EFFECT: Mapping[str, bool] = MappingProxyType({"affects_result": False})
GA_ONLY: Mapping[str, bool] = MappingProxyType({"ga_only": True})
RPN_ONLY: Mapping[str, bool] = MappingProxyType({"rpn_only": True})


def flags(*parts: Mapping[str, bool]) -> Mapping[str, bool]:
    """Several flags on one field: ``field(metadata=flags(INFERENCE_ONLY, GA_ONLY))``."""
    return MappingProxyType({k: v for part in parts for k, v in part.items()})


def is_inference_only(f: Field) -> bool:
    return bool(f.metadata.get("inference_only", False))


def affects_result(f: Field) -> bool:
    return bool(f.metadata.get("affects_result", True))


def read_by(f: Field, kind: str) -> bool:
    """Whether a ``kind`` proposer ("rpn" or "ga_rpn") reads the field."""
    return not f.metadata.get("ga_only" if kind == "rpn" else "rpn_only", False)
