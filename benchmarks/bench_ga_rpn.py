"""GA-RPN vs the RPN baseline on the same backbone and images, in one run, plus the masked
(sparse) head against the dense head at several active fractions.

1. Trains both proposers (tiny FPN backbone, 256 px) for ``--train-steps`` steps on the synthetic
   dataset, timing each train step (batch ``--batch``), then times inference per image on the
   validation images. So few steps leave GA-RPN's location branch untrained (it keeps nearly
   every location), so with ``--trained WORKDIR`` inference is also timed with the models a
   pipeline run trained there (e.g. runs/default after ``make full``): what a trained GA-RPN keeps.
2. Times the part of the GA head that runs after the location filter (feature adaption + cls +
   reg convs) densely and with masks of 100%, 30%, 6.5% and 3% active positions.

Prints a table and writes JSON (default benchmarks/results/ga_rpn.json). Goals: sparse head at
6.5% active <= 0.2x dense; GA-RPN inference <= 1.2x RPN (the paper's own: 1.44x).
"""
from __future__ import annotations

import argparse
import functools
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from ga_models import GuidedAnchorHead, ProposerConfig, build_proposer, load_state_dict_checked
from stages.common.datasets import CocoDetection, collate
from stages.common.synthetic import generate

GOALS = {"max_sparse_head_ratio_at_6.5%": 0.2, "max_ga_vs_rpn_inference_ratio": 1.2}
FRACTIONS = (1.0, 0.3, 0.065, 0.03)


def timed(fn, repeats: int) -> float:
    """Median wall seconds of fn() over repeats (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def train_and_time(kind: str, train: CocoDetection, steps: int, batch: int) -> tuple[torch.nn.Module, float]:
    """Train a proposer for ``steps`` SGD steps; returns it and the median seconds per step."""
    torch.manual_seed(0)
    model = build_proposer(ProposerConfig(kind=kind)).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    loader = torch.utils.data.DataLoader(train, batch_size=batch, shuffle=True, collate_fn=collate, drop_last=True)
    step_times = []
    while len(step_times) < steps:
        for images, targets in loader:
            start = time.perf_counter()
            losses = model(images, targets)
            optimizer.zero_grad()
            sum(losses.values()).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 35.0)
            optimizer.step()
            step_times.append(time.perf_counter() - start)
            if len(step_times) == steps:
                break
    return model.eval(), sorted(step_times[5:])[len(step_times[5:]) // 2]


def paired_inference_seconds(models: dict[str, torch.nn.Module], images: list[torch.Tensor], repeats: int = 5
                             ) -> dict[str, tuple[float, float]]:
    """Per model (seconds per image at batch 1, mean anchors per image). The models run in turn on
    each image (one warm-up pass first), ``repeats`` times; a model's time is the sum over the images
    of its median per image, so drift of a shared, noisy machine hits every model alike."""
    times = {name: [[] for _ in images] for name in models}
    anchors = {name: [] for name in models}
    with torch.no_grad():
        for image in images[:2]:
            for model in models.values():
                model([image])
        for _ in range(repeats):
            for index, image in enumerate(images):
                for name, model in models.items():
                    start = time.perf_counter()
                    out = model([image])
                    times[name][index].append(time.perf_counter() - start)
                    anchors[name].append(float(out[0]["num_anchors"]))
    return {
        name: (sum(sorted(t)[len(t) // 2] for t in times[name]) / len(images), sum(anchors[name]) / len(anchors[name]))
        for name in models
    }


def trained_models(workdir: Path, preset: str = "default") -> dict[str, torch.nn.Module]:
    """The rpn and ga_rpn models (train/<key>/model.pt) that `pipeline full --preset PRESET`
    trains, from the workdir's store: for each, the newest training whose config slice is the
    preset's (whatever code version trained it), so a sweep's trainings in the same store
    (another lr, another seed) are never taken for it."""
    from pipeline.config import resolve
    from pipeline.dag import build_dag, keyed_slice

    cfg = resolve(preset)
    dag = build_dag(cfg, ("rpn", "ga_rpn"))
    wanted = {kind: json.loads(json.dumps(keyed_slice(cfg, dag[f"train/{kind}"]))) for kind in ("rpn", "ga_rpn")}
    newest: dict[str, tuple[float, Path, dict]] = {}
    for manifest_file in workdir.glob("train/*/manifest.json"):
        manifest = json.loads(manifest_file.read_text())
        kind = manifest["config"]["proposer"]["kind"]
        if manifest["config"] == wanted.get(kind) and (kind not in newest or manifest["created"] > newest[kind][0]):
            newest[kind] = (manifest["created"], manifest_file.parent / "model.pt", manifest["config"]["proposer"])
    if set(newest) != {"rpn", "ga_rpn"}:
        raise SystemExit(f"{workdir}: no trained {sorted({'rpn', 'ga_rpn'} - set(newest))} with the config of the "
                         f"{preset} preset (run `python -m pipeline full --preset {preset} --workdir {workdir}`)")
    models = {}
    for kind, (_, weights, proposer) in newest.items():
        model = build_proposer(ProposerConfig(**proposer)).eval()
        state = torch.load(weights, map_location="cpu", weights_only=True)
        load_state_dict_checked(model, state.get("model", state), str(weights))
        models[kind] = model
    return models


def head_times(channels: int, size: int, batch: int, repeats: int) -> dict[str, float]:
    """Seconds of feature adaption + cls + reg, dense vs masked at each active fraction."""
    torch.manual_seed(0)
    head = GuidedAnchorHead(channels).eval()
    x = torch.randn(batch, channels, size, size)
    shape = torch.randn(batch, 2, size, size)

    def after_filter(mask):
        with torch.no_grad():
            feat = head.feature_adaption(x, shape, mask)
            head.conv_cls(feat, mask), head.conv_reg(feat, mask)

    result = {"dense": timed(lambda: after_filter(None), repeats)}
    for fraction in FRACTIONS:
        mask = torch.rand(batch, size, size) < fraction
        result[f"{fraction:.1%}"] = timed(functools.partial(after_filter, mask), repeats)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--val-images", type=int, default=20)
    parser.add_argument("--head-size", type=int, default=128, help="side of the feature map of the head benchmark")
    parser.add_argument("--head-channels", type=int, default=64)
    parser.add_argument("--trained", type=Path, help="a pipeline workdir whose trained models to time too")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ga_rpn.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        train_ann, train_root = generate(Path(tmp) / "train", 40, 256, seed=0)
        val_ann, val_root = generate(Path(tmp) / "val", args.val_images, 256, seed=1)
        train = CocoDetection(train_ann, train_root, train=True)
        val_images = [image for image, _ in CocoDetection(val_ann, val_root)]
        models, steps = {}, {}
        for kind in ("rpn", "ga_rpn"):
            models[kind], steps[kind] = train_and_time(kind, train, args.train_steps, args.batch)
        if args.trained:
            models.update({f"{kind} (trained)": model for kind, model in trained_models(args.trained).items()})
        rows = {}
        for kind, (infer, anchors) in paired_inference_seconds(models, val_images).items():
            rows[kind] = {"inference_s_per_image": infer, "anchors_per_image": anchors}
            if kind in steps:
                rows[kind]["train_step_s"] = steps[kind]

    heads = head_times(args.head_channels, args.head_size, 2, repeats=5)
    ratios = {
        "ga_vs_rpn_train_step": rows["ga_rpn"]["train_step_s"] / rows["rpn"]["train_step_s"],
        "ga_vs_rpn_inference": rows["ga_rpn"]["inference_s_per_image"] / rows["rpn"]["inference_s_per_image"],
        **({"ga_vs_rpn_inference_trained": rows["ga_rpn (trained)"]["inference_s_per_image"]
            / rows["rpn (trained)"]["inference_s_per_image"]} if args.trained else {}),
        **{f"sparse_head_{k}_vs_dense": v / heads["dense"] for k, v in heads.items() if k != "dense"},
    }
    print(f"{'model':16} {'train step s':>13} {'infer s/img':>12} {'anchors/img':>12}")
    for kind, row in rows.items():
        step = f"{row['train_step_s']:13.3f}" if "train_step_s" in row else f"{'':13}"
        print(f"{kind:16} {step} {row['inference_s_per_image']:12.4f} {row['anchors_per_image']:12.0f}")
    print(f"\nhead after the location filter, {args.head_channels} ch, 2 x {args.head_size}^2:")
    for key, seconds in heads.items():
        print(f"  {key:>7}: {seconds * 1000:8.2f} ms  ({seconds / heads['dense']:.3f}x dense)")
    print("\nratios:", json.dumps({k: round(v, 3) for k, v in ratios.items()}))
    met = {
        "max_sparse_head_ratio_at_6.5%": ratios["sparse_head_6.5%_vs_dense"] <= GOALS["max_sparse_head_ratio_at_6.5%"],
        "max_ga_vs_rpn_inference_ratio": ratios.get("ga_vs_rpn_inference_trained", ratios["ga_vs_rpn_inference"])
        <= GOALS["max_ga_vs_rpn_inference_ratio"],
    }
    print("goals met:", met)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "models": rows, "head_seconds": heads, "ratios": ratios, "goals": GOALS, "goals_met": met,
    }, indent=2))


if __name__ == "__main__":
    main()
