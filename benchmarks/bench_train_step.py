"""Where a training step's time goes, for every model kind the ``default`` preset trains, in one
run: RPN, GA-RPN, Fast R-CNN on cached proposals (RPN's and GA-RPN's), Faster R-CNN, GA-Faster
R-CNN, RetinaNet and GA-RetinaNet, on the same images (the synthetic default's, 256 px, batch 4).

Each step is cut into phases by timing the model's own parts (exclusive times: a part nested in
another is not counted twice):

    data        the DataLoader's next batch (PNG decoding, flips, collate)
    transform   normalise + resize + batch (``model.transform``)
    backbone    the FPN backbone
    head        the proposal head or the RetinaNet head (convs, feature adaption)
    anchors     anchor generation (the RPN's and RetinaNet's generators)
    ga_targets  GA location / shape targets (``AnchorGuidance.losses``'s target half)
    ga_loss     the GA location / shape losses (the rest of ``AnchorGuidance.losses``)
    rpn_loss    RPN assigner, sampler and losses
    roi_heads   the R-CNN box head, its sampler and losses
    det_loss    RetinaNet's matcher and losses
    other       the forward's rest (proposal selection in training, glue)
    backward    ``loss.backward()``
    optimizer   gradient clipping, SGD step, zero_grad

Steps of the kinds run in turn (kind 1's step, kind 2's, ..., then again), so the drift of a shared,
noisy machine hits every kind alike; each kind's figure is the median over its timed steps.

    python benchmarks/bench_train_step.py [--steps 6] [--threads 1] [--kinds rpn,ga_rpn]
    python benchmarks/bench_train_step.py --kinds fast_rcnn_rpn,fast_rcnn_rpn+tv_roi   # RoIAlign A/B

Prints a table (seconds per step, per phase) and the GA-RPN / RPN ratio, and writes JSON
(default benchmarks/results/train_step.json). Goal: GA-RPN's step <= 1.3x RPN's.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import platform
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn
from torchvision.ops import MultiScaleRoIAlign

from ga_models import build_proposer, guidance
from ga_models.detectors import ROI_FEATURE_MAPS, ROI_RESOLUTION, build_detector
from pipeline.config import resolve
from stages.common.datasets import CocoDetection, collate
from stages.common.detection import num_classes
from stages.common.synthetic import generate
from stages.common.training import default_step

GOALS = {"max_ga_rpn_vs_rpn_step_ratio": 1.3}
PROPOSERS = ("rpn", "ga_rpn")
DETECTORS = ("fast_rcnn_rpn", "fast_rcnn_ga_rpn", "faster_rcnn", "ga_faster_rcnn", "retinanet", "ga_retinanet")
PHASES = ("data", "transform", "backbone", "head", "anchors", "ga_targets", "ga_loss", "rpn_loss", "roi_heads",
          "det_loss", "other", "backward", "optimizer")
TARGET_FUNCTIONS = ("approx_anchors", "location_targets", "sample_shape_locations", "shape_targets")


class PhaseTimer:
    """Exclusive wall time per phase: a phase entered inside another is subtracted from it."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._stack: list[list] = []  # [name, start, time spent in children]

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._stack.append([name, time.perf_counter(), 0.0])
        try:
            yield
        finally:
            name, start, children = self._stack.pop()
            total = time.perf_counter() - start
            self.seconds[name] += total - children
            if self._stack:
                self._stack[-1][2] += total

    def wrap(self, obj, attr: str, name: str) -> None:
        """Time every call of ``obj.attr`` (a bound method or a module function) as phase ``name``."""
        original = getattr(obj, attr)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            with self.phase(name):
                return original(*args, **kwargs)

        object.__setattr__(obj, attr, timed)  # also on a frozen dataclass (AnchorGuidance)


def instrument(model: nn.Module, timer: PhaseTimer) -> None:
    """Wrap the parts of ``model`` that PHASES name (whichever of them the model has)."""
    timer.wrap(model.transform, "forward", "transform")
    timer.wrap(model.backbone, "forward", "backbone")
    rpn = getattr(model, "rpn", None)
    if rpn is not None and hasattr(rpn, "head"):
        timer.wrap(rpn.head, "forward", "head")
        if getattr(rpn, "anchor_generator", None) is not None:
            timer.wrap(rpn.anchor_generator, "forward", "anchors")
        timer.wrap(rpn, "box_losses", "rpn_loss")
        if hasattr(rpn, "guidance"):
            timer.wrap(rpn.guidance, "losses", "ga_loss")
    if hasattr(model, "roi_heads"):
        timer.wrap(model.roi_heads, "forward", "roi_heads")
    if hasattr(model, "compute_loss"):  # RetinaNet
        timer.wrap(model.head, "forward", "head")
        timer.wrap(model, "compute_loss", "det_loss")
        if getattr(model, "anchor_generator", None) is not None:
            timer.wrap(model.anchor_generator, "forward", "anchors")
        if hasattr(model, "guidance"):
            timer.wrap(model.guidance, "losses", "ga_loss")


@contextlib.contextmanager
def timed_targets(timer: PhaseTimer) -> Iterator[None]:
    """Time the GA target functions ``AnchorGuidance.losses`` calls as phase ``ga_targets``."""
    originals = {name: getattr(guidance, name) for name in TARGET_FUNCTIONS}
    for name in TARGET_FUNCTIONS:
        timer.wrap(guidance, name, "ga_targets")
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(guidance, name, fn)


def jittered_proposals(targets: list[dict], count: int, generator: torch.Generator) -> list[dict]:
    """Stand-ins for cached proposals: ``count`` boxes per image jittered around its ground truth
    (or anywhere, for an image without any), in the image's pixels."""
    out = []
    for target in targets:
        gt = target["boxes"] if len(target["boxes"]) else torch.tensor([[0.0, 0.0, 64.0, 64.0]])
        base = gt[torch.randint(len(gt), (count,), generator=generator)]  # [count, 4]
        wh = (base[:, 2:] - base[:, :2]).repeat(1, 2)
        boxes = base + 0.3 * wh * torch.randn(count, 4, generator=generator)  # [count, 4]
        corners = torch.cat([boxes[:, :2].minimum(boxes[:, 2:]), boxes[:, :2].maximum(boxes[:, 2:]) + 1], dim=1)
        out.append({"boxes": corners.clamp(0, 256), "scores": torch.rand(count, generator=generator)})
    return out


def build(kind: str, cfg, classes: int) -> tuple[nn.Module, Callable]:
    """The model of a kind and its training forward (images, targets) -> losses. ``<kind>+tv_roi``:
    an R-CNN pooling with torchvision's MultiScaleRoIAlign instead of ``GatherRoIAlign``."""
    if kind in PROPOSERS:
        return build_proposer(cfg.proposer_for(kind)), default_step
    kind, _, pooler = kind.partition("+")
    model = build_detector(cfg.detector_for(kind), classes)
    if pooler == "tv_roi":
        model.roi_heads.box_roi_pool = MultiScaleRoIAlign(ROI_FEATURE_MAPS, ROI_RESOLUTION, sampling_ratio=2)
    if cfg.detector_for(kind).kind != "fast_rcnn":
        return model, default_step
    count = cfg.detector_for(kind).rcnn.proposals_train
    generator = torch.Generator().manual_seed(0)

    def step(m, images, targets):
        return default_step(functools.partial(m, proposals=jittered_proposals(targets, count, generator)), images, targets)

    return model, step


def profile(kinds: list[str], dataset: CocoDetection, steps: int, warmup: int, batch: int) -> dict[str, dict]:
    """Per kind: median seconds per step and the median seconds of each phase."""
    cfg = resolve("default")
    classes = num_classes(dataset.coco)
    runs = {}
    for kind in kinds:
        torch.manual_seed(0)
        model, step = build(kind, cfg, classes)
        timer = PhaseTimer()
        instrument(model, timer)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=0.005, momentum=0.9, weight_decay=1e-4)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, collate_fn=collate, drop_last=True,
                                             generator=torch.Generator().manual_seed(0))
        runs[kind] = dict(model=model.train(), step=step, timer=timer, params=params, optimizer=optimizer,
                          batches=iter(loader), loader=loader, steps=[], phases=defaultdict(list))
    for index in range(warmup + steps):
        for run in runs.values():
            timer: PhaseTimer = run["timer"]
            timer.seconds.clear()
            started = time.perf_counter()
            with timer.phase("data"):
                try:
                    images, targets = next(run["batches"])
                except StopIteration:
                    run["batches"] = iter(run["loader"])
                    images, targets = next(run["batches"])
            with timed_targets(timer), timer.phase("other"):
                losses = run["step"](run["model"], images, targets)
            total = sum(losses.values())
            with timer.phase("backward"):
                total.backward()
            with timer.phase("optimizer"):
                torch.nn.utils.clip_grad_norm_(run["params"], 10.0)
                run["optimizer"].step()
                run["optimizer"].zero_grad(set_to_none=True)
            if index >= warmup:
                run["steps"].append(time.perf_counter() - started)
                for phase in PHASES:
                    run["phases"][phase].append(timer.seconds.get(phase, 0.0))
    return {kind: {"seconds_per_step": statistics.median(run["steps"]),
                   "phases": {p: statistics.median(v) for p, v in run["phases"].items()}}
            for kind, run in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per kind (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--images", type=int, default=64, help="synthetic train images generated (default-preset style)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (a 1-CPU Ray Train worker: 1)")
    parser.add_argument("--kinds", default=",".join(PROPOSERS + DETECTORS),
                        help="comma-separated; an R-CNN kind + '+tv_roi' pools with torchvision's RoIAlign (A/B)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_step.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kinds = [k for k in args.kinds.split(",") if k]
    with tempfile.TemporaryDirectory() as tmp:
        ann, root = generate(Path(tmp) / "train", args.images, 256, seed=0)
        dataset = CocoDetection(ann, root, train=True)
        results = profile(kinds, dataset, args.steps, args.warmup, args.batch)
    shown = [p for p in PHASES if any(r["phases"][p] > 0.0005 for r in results.values())]
    print(f"seconds per training step (batch {args.batch}, 256 px, {args.threads} thread(s), median of {args.steps})")
    print(f"{'kind':<18}{'step':>7}" + "".join(f"{p:>11}" for p in shown))
    for kind, r in results.items():
        print(f"{kind:<18}{r['seconds_per_step']:>7.3f}" + "".join(f"{r['phases'][p]:>11.3f}" for p in shown))
    summary = {"results": results, "goals": GOALS, "threads": args.threads, "batch": args.batch,
               "machine": platform.processor() or platform.machine(), "torch": torch.__version__}
    if "rpn" in results and "ga_rpn" in results:
        ratio = results["ga_rpn"]["seconds_per_step"] / results["rpn"]["seconds_per_step"]
        summary["ga_rpn_vs_rpn_step_ratio"] = ratio
        print(f"GA-RPN / RPN step: {ratio:.2f}x (goal <= {GOALS['max_ga_rpn_vs_rpn_step_ratio']}x)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
