"""Where GA-RPN's masked (sparse) head stops paying, and GA-RPN's inference against RPN's at any
active fraction.

1. The part of the head that runs after the location filter (feature adaption + cls + reg convs)
   timed dense and masked, per FPN level size, at active fractions from 3% to 100%, with 1 and 2
   threads: the crossovers behind ``ga_models.head.sparse_pays``.
2. With ``--trained WORKDIR`` (a pipeline workdir after ``make full``): its trained GA-RPN and RPN
   on the same val images at batch 1, with eps_L set so that GA-RPN keeps from ~3% to 100% of the
   locations, 1 and 2 threads: the GA-RPN / RPN time ratio (goal <= 1.0 at every fraction).

Prints tables and writes JSON (default benchmarks/results/sparse_head.json).
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path
from tempfile import TemporaryDirectory

import torch
from bench_ga_rpn import paired_inference_seconds, timed, trained_models  # (scripts: their folder is on sys.path)

from ga_models import GuidedAnchorHead

FRACTIONS = (0.03, 0.065, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.85, 1.0)
SIZES = (64, 32, 16, 8)  # P2-P5 of a 256 px input


def after_filter_seconds(head: GuidedAnchorHead, size: int, fraction: float | None, repeats: int) -> float:
    """Median seconds of adaption + cls + reg on one [1, C, size, size] level; ``fraction`` None: dense."""
    gen = torch.Generator().manual_seed(size)
    x = torch.randn(1, head.rpn_conv.out_channels, size, size, generator=gen)
    shape = torch.randn(1, 2, size, size, generator=gen)
    mask = None if fraction is None else torch.rand(1, size, size, generator=gen) < fraction

    def run():
        with torch.no_grad():
            feat = head.feature_adaption(x, shape, mask)
            head.conv_cls(feat, mask), head.conv_reg(feat, mask)

    return timed(run, repeats)


def kept_fraction(model: torch.nn.Module, images: list[torch.Tensor]) -> float:
    """Mean fraction of all locations GA-RPN keeps at its current eps_L over the images."""
    total = sum(s * s for s in (64, 32, 16, 8, 4))  # P2-P6 of a 256 px input
    with torch.no_grad():
        return sum(float(model([image])[0]["num_anchors"]) for image in images) / len(images) / total


def model_ratios(workdir: Path, num_images: int) -> dict[str, dict]:
    """GA-RPN vs RPN seconds per image at eps_L giving ~3% to 100% kept locations, 1 and 2 threads."""
    from stages.common.datasets import CocoDetection
    from stages.common.synthetic import generate

    models = trained_models(workdir)
    with TemporaryDirectory() as tmp:
        ann, root = generate(Path(tmp) / "val", num_images, 256, seed=1)
        images = [image for image, _ in CocoDetection(ann, root)]
    out = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for eps in (0.0, 0.01, 0.05, 0.1, 0.2, 0.4, 0.6):
            models["ga_rpn"].rpn.loc_threshold = eps
            paired = paired_inference_seconds(models, images)  # RPN beside GA-RPN on every image: drift cancels
            (rpn, _), (ga, _) = paired["rpn"], paired["ga_rpn"]
            kept = kept_fraction(models["ga_rpn"], images)
            out[f"{threads}t_eps{eps}"] = {"kept": kept, "ga_s": ga, "rpn_s": rpn, "ratio": ga / rpn}
            print(f"{threads} thread(s), eps_L {eps:<5} GA-RPN keeps {kept:6.1%}: {1000 * ga:6.1f} ms vs RPN "
                  f"{1000 * rpn:6.1f} ms per image = {ga / rpn:.2f}x")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--trained", type=Path, help="a pipeline workdir whose trained RPN and GA-RPN to compare")
    parser.add_argument("--images", type=int, default=20, help="val images of the model comparison")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sparse_head.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    head = GuidedAnchorHead(args.channels).eval()
    results = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for size in SIZES:
            dense = after_filter_seconds(head, size, None, args.repeats)
            ratios = {f: after_filter_seconds(head, size, f, args.repeats) / dense for f in FRACTIONS}
            faster = [f for f, r in ratios.items() if r < 1.0]
            results[f"{threads}t_{size}"] = {"dense_ms": 1000 * dense, "masked_vs_dense": ratios,
                                             "crossover": max(faster) if faster else 0.0}
            print(f"{threads} thread(s), {size:>3}x{size:<3} dense {1000 * dense:7.2f} ms  masked/dense: "
                  + " ".join(f"{f:.0%}:{r:.2f}" for f, r in ratios.items())
                  + f"  -> masked faster up to {results[f'{threads}t_{size}']['crossover']:.0%}")
    models = model_ratios(args.trained, args.images) if args.trained else {}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": {"platform": platform.platform(), "torch": torch.__version__},
        "settings": {"channels": args.channels, "repeats": args.repeats, "trained": str(args.trained)},
        "head": results, "models": models}, indent=2))


if __name__ == "__main__":
    main()
