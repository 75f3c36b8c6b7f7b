"""The paper's claims, each judged on this run's tables: reproduced, not reproduced, or pending
(a number it needs is not measured yet), with the evidence in words. Pure: tables in, verdicts
out (``pipeline.report.tables``).

When is a difference real? GA-RPN varies by several AR points from run to run here, so a
difference counts only when it exceeds ``margin`` (the claim's size, 0 for "above") by more than
twice its standard error over seeds. With a single run per side there is no error estimate: the
sign decides, and the evidence says "1 seed": an anecdote, not a result.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from pipeline.report import paper
from pipeline.report.tables import DETECTOR_LABELS, Stat, Table

REPRODUCED, NOT_REPRODUCED, PENDING = "reproduced", "not reproduced", "pending"
RULE = ("a difference counts when it exceeds the claim's margin by more than twice its standard error over seeds; "
        "with one run per side the sign decides, an anecdote (run the sweeps with --seeds 3). Pending: a number the "
        "claim needs is not measured yet.")
FAR_FEWER = 0.5  # "far fewer anchors": at most this fraction of the other's
LARGE_GAIN = 1.0  # "a large gain": at least this many AR points
KEEPS_RECALL = 0.5  # "keeps recall": loses at most this many AR points
INSENSITIVE = 1.0  # "insensitive": AR@1000 varies by at most this many points over the settings


@dataclass(frozen=True)
class Verdict:
    status: str
    evidence: str


@dataclass(frozen=True)
class Claim:
    """A claim of the paper: its words, the paper's own evidence, the tables it rests on (their
    anchors) and the rule that judges it."""

    text: str
    paper: str
    tables: tuple[str, ...]
    judge: Callable[[Mapping[str, Table]], Verdict]


@dataclass(frozen=True)
class Difference:
    """``a - b`` with its standard error (None with a single run on either side)."""

    value: float
    se: float | None
    seeds: tuple[int, int]

    def exceeds(self, margin: float = 0.0) -> bool:
        """The difference is above ``margin`` by more than twice its standard error."""
        return self.value - margin > 2 * (self.se or 0.0)

    def __str__(self) -> str:
        """``+5.0 (1 seed)``, ``+5.0 ± 1.2 (1 s.e., 3 vs 3 seeds)``."""
        seeds = "1 seed" if self.seeds == (1, 1) else f"{self.seeds[0]} vs {self.seeds[1]} seeds"
        if self.se is None:
            return f"{self.value:+.1f} ({seeds})"
        return f"{self.value:+.1f} ± {self.se:.1f} (1 s.e., {seeds})"


def difference(a: Stat, b: Stat) -> Difference:
    se = math.sqrt(a.std ** 2 / a.n + b.std ** 2 / b.n) if a.n > 1 and b.n > 1 else None
    return Difference(a.mean - b.mean, se, (a.n, b.n))


def _stats(table: Table | None, wanted: Sequence[tuple[str, str]]) -> list[Stat] | None:
    """The stats of (row label, metric) pairs, or None when any is not measured."""
    if table is None:
        return None
    stats = [table.stat(label, metric) for label, metric in wanted]
    return None if any(s is None for s in stats) else stats


def _pending(table: str, what: str) -> Verdict:
    return Verdict(PENDING, f"needs {what} ({table} has pending rows)")


def _verdict(ok: bool, evidence: str) -> Verdict:
    return Verdict(REPRODUCED if ok else NOT_REPRODUCED, evidence)


def ga_rpn_recall(tables: Mapping[str, Table]) -> Verdict:
    stats = _stats(tables.get("table-1"), [("GA-RPN", "AR_1000"), ("RPN", "AR_1000"), ("GA-RPN", "AR_100"),
                                           ("RPN", "AR_100"), ("GA-RPN", "anchors_per_image"), ("RPN", "anchors_per_image")])
    if stats is None:
        return _pending("Table 1", "RPN and GA-RPN")
    ga1000, rpn1000, ga100, rpn100, ga_anchors, rpn_anchors = stats
    d1000, d100 = difference(ga1000, rpn1000), difference(ga100, rpn100)
    ratio = ga_anchors.mean / rpn_anchors.mean
    ok = d1000.exceeds() and d100.exceeds() and ratio <= FAR_FEWER
    return _verdict(ok, f"GA-RPN minus RPN: AR@1000 {d1000}, AR@100 {d100}; GA-RPN uses {100 * ratio:.0f}% of RPN's "
                        f"anchors (rule: both gaps clear, at most {100 * FAR_FEWER:.0f}%)")


def shape_largest(tables: Mapping[str, Table]) -> Verdict:
    stats = _stats(tables.get("table-4"), [("S", "AR_1000"), ("L", "AR_1000"), ("RPN", "AR_1000")])
    if stats is None:
        return _pending("Table 4", "RPN, L and S")
    s, loc, rpn = stats
    s_gain, l_gain, s_over_l = difference(s, rpn), difference(loc, rpn), difference(s, loc)
    return _verdict(s_gain.exceeds() and s_over_l.exceeds(),
                    f"AR@1000 over RPN: S {s_gain}, L {l_gain}; S minus L {s_over_l} (rule: S clearly above RPN and L)")


def feature_adaption(tables: Mapping[str, Table]) -> Verdict:
    stats = _stats(tables.get("table-4"), [("L+S+F.A.", "AR_1000"), ("L+S", "AR_1000")])
    if stats is None:
        return _pending("Table 4", "L+S and L+S+F.A.")
    gain = difference(*stats)
    return _verdict(gain.exceeds(LARGE_GAIN),
                    f"L+S+F.A. minus L+S, AR@1000: {gain} (rule: more than {LARGE_GAIN:g} point beyond noise)")


def location_threshold(tables: Mapping[str, Table]) -> Verdict:
    stats = _stats(tables.get("table-5"), [("eps_L = 0.0", "AR_1000"), ("eps_L = 0.01", "AR_1000"),
                                           ("eps_L = 0.0", "anchors_per_image"), ("eps_L = 0.01", "anchors_per_image")])
    if stats is None:
        return _pending("Table 5", "eps_L 0 and 0.01")
    ar0, ar001, anchors0, anchors001 = stats
    loss = difference(ar0, ar001)
    ratio = anchors001.mean / anchors0.mean
    ok = not loss.exceeds(KEEPS_RECALL) and ratio <= FAR_FEWER
    return _verdict(ok, f"AR@1000 lost from eps_L 0 to 0.01: {loss}; anchors kept {100 * ratio:.0f}% (rule: loses at "
                        f"most {KEEPS_RECALL:g} point beyond noise, keeps at most {100 * FAR_FEWER:.0f}% of the anchors)")


def insensitive_to_k(tables: Mapping[str, Table]) -> Verdict:
    table = tables.get("sensitivity-k")
    stats = _stats(table, [(row.label, "AR_1000") for row in table.rows] if table else [])
    if not stats:
        return _pending("the K sensitivity table", "every K")
    means = [s.mean for s in stats]
    spread = max(means) - min(means)
    seeds = min(s.n for s in stats)
    return _verdict(spread <= INSENSITIVE, f"AR@1000 over K = {', '.join(r.label.split()[-1] for r in table.rows)}: "
                                           f"{', '.join(f'{m:.1f}' for m in means)}, range {spread:.1f} points, "
                                           f"{seeds} seed(s) each (rule: range at most {INSENSITIVE:g})")


def higher_iou(tables: Mapping[str, Table]) -> Verdict:
    rows = [(f"{p}, {n} proposals, IoU {iou}", "AP") for n in (300, 1000) for p in ("GA-RPN", "RPN") for iou in (0.6, 0.5)]
    table = tables.get("table-7")
    measured = {n: _stats(table, rows[4 * i:4 * i + 4]) for i, n in enumerate((300, 1000))}
    measured = {n: s for n, s in measured.items() if s is not None}
    if 1000 not in measured:
        return _pending("Table 7", "RPN and GA-RPN at IoU 0.5 and 0.6 with 1000 proposals")
    parts, ok = [], True
    for n, (ga6, ga5, rpn6, rpn5) in measured.items():
        at6, at5 = difference(ga6, rpn6), difference(ga5, rpn5)
        more = Difference(at6.value - at5.value, math.hypot(at6.se, at5.se) if at6.se is not None and at5.se is not None
                          else None, at6.seeds)
        ok = ok and more.exceeds()
        parts.append(f"{n} proposals: GA-RPN's AP gain {at6.value:+.1f} at IoU 0.6 vs {at5.value:+.1f} at 0.5 ({more})")
    return _verdict(ok, "; ".join(parts) + " (rule: the gain clearly larger at 0.6)")


def finetune(tables: Mapping[str, Table]) -> Verdict:
    stats = _stats(tables.get("table-3"), [(DETECTOR_LABELS["finetune_ga_rpn"], "AP"), (DETECTOR_LABELS["finetune_rpn"], "AP")])
    if stats is None:
        return _pending("Table 3", "both fine-tuned detectors")
    gain = difference(*stats)
    return _verdict(gain.exceeds(), f"fine-tuned on GA-RPN minus on RPN proposals, AP: {gain} (rule: clearly above)")


def detectors(tables: Mapping[str, Table]) -> Verdict:
    table = tables.get("table-2")
    gains = {}
    for base, guided in paper.TABLE2_PAIRS:
        stats = _stats(table, [(DETECTOR_LABELS[guided], "AP"), (DETECTOR_LABELS[base], "AP")])
        if stats is None:
            return _pending("Table 2", f"{DETECTOR_LABELS[base]} and {DETECTOR_LABELS[guided]}")
        gains[DETECTOR_LABELS[base]] = difference(*stats)
    return _verdict(all(g.exceeds() for g in gains.values()),
                    "; ".join(f"{k}: {g}" for k, g in gains.items()) + " (GA minus baseline AP; rule: every gain clear)")


CLAIMS: tuple[Claim, ...] = (
    Claim("GA-RPN recalls more than RPN with far fewer anchors", "AR@1000 68.5 vs 59.4 (+9.1), AR@100 +11.7, "
          "about 90% fewer anchors", ("table-1",), ga_rpn_recall),
    Claim("The shape branch is the largest single gain", "S +4.2 AR@1000 over RPN, L +0.1", ("table-4",), shape_largest),
    Claim("Feature adaption is a large gain", "L+S+F.A. 68.5 vs L+S 63.8 AR@1000 (+4.7)", ("table-4",), feature_adaption),
    Claim("eps_L = 0.01 keeps the recall with a fraction of the anchors", "same AR, 22274 vs 75583 anchors (29%)",
          ("table-5",), location_threshold),
    Claim("Insensitive to the number of sampled shapes K", "AR@1000 68.3-68.5 for K = 3, 9, 15", ("sensitivity-k",),
          insensitive_to_k),
    Claim("GA-RPN proposals help Fast R-CNN more at a higher IoU threshold", "gain +0.7 AP at IoU 0.5, +1.7 at 0.6 "
          "(1000 proposals)", ("table-7",), higher_iou),
    Claim("Fine-tuning a trained Faster R-CNN on GA-RPN proposals beats fine-tuning on RPN's",
          "39.6 vs 37.3 AP", ("table-3",), finetune),
    Claim("Guided anchoring improves every detector", "Fast R-CNN +2.3, Faster R-CNN +2.7, RetinaNet +1.2 AP",
          ("table-2",), detectors),
)


def judge(tables: Mapping[str, Table], claims: Sequence[Claim] = CLAIMS) -> list[tuple[Claim, Verdict]]:
    return [(claim, claim.judge(tables)) for claim in claims]
