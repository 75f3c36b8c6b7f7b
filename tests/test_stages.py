"""Every stage through its one entry point ``run(cfg, inputs, out, executor)``, directly, without
Ray or MLflow: the smoke chain data -> train -> proposals -> eval_proposals, the detectors
(train_detector -> finetune -> eval_detector) with a ``LocalExecutor``, each stage
reading only what the previous ones returned."""

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from ga_models import ProposerConfig
from stages import data, eval_detector, eval_proposals, finetune, proposals, train_detector
from stages import train as train_stage
from stages.common.detection import DetectorsConfig
from stages.common.inference import ProposalsConfig
from stages.common.proposal_cache import ProposalCache
from stages.common.training import TrainConfig
from stages.contract import LocalExecutor, StageResult, local_input, local_output, only
from stages.data import DataConfig

PROPOSER = ProposerConfig(kind="ga_rpn", min_size=128, max_size=128, fpn_channels=16)
TRAIN = TrainConfig(epochs=1, batch_size=4, lr=0.01, warmup_iters=1, lr_steps=())
DETECTORS = DetectorsConfig(representation_size=32, retina_octave_base_scale=2.0, train=TRAIN, finetune_epochs=2)
SHARDS = ProposalsConfig(2, 2)


def as_input(node_id, out, result: StageResult):
    return local_input(node_id, out.dir, {"outputs": result.outputs, "metrics": result.metrics})


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    executor = LocalExecutor()
    nodes = {}

    def step(node_id, module, cfg, deps):
        out = local_output(root / node_id.replace("/", "_"))
        result = module.run(cfg, {d: nodes[d][0] for d in deps}, out, executor)
        assert isinstance(result, StageResult)
        nodes[node_id] = (as_input(node_id, out, result), out, result)
        return out, result

    step("data", data, DataConfig(synthetic="smoke"), [])
    step("train/ga_rpn", train_stage, train_stage.TrainProposerConfig(PROPOSER, TRAIN), ["data"])
    step("proposals/ga_rpn", proposals, proposals.ProposalsStageConfig(PROPOSER, SHARDS, ("val", "train")),
         ["train/ga_rpn", "data"])
    step("eval_proposals/ga_rpn", eval_proposals, eval_proposals.EvalProposalsConfig("GA-RPN"),
         ["proposals/ga_rpn", "data"])
    for variant in ("fast_rcnn_ga_rpn", "ga_faster_rcnn", "ga_retinanet"):
        reads = ["proposals/ga_rpn"] if variant.startswith("fast") else []
        spec = DETECTORS.spec(variant, PROPOSER)
        step(f"train_detector/{variant}", train_detector, train_detector.TrainDetectorConfig(spec, TRAIN),
             ["data", "train/ga_rpn", *reads])
        step(f"eval_detector/{variant}", eval_detector, eval_detector.EvalDetectorConfig(spec, SHARDS),
             [f"train_detector/{variant}", "data", *reads])
    spec = DETECTORS.spec("finetune_ga_rpn", PROPOSER)
    step("finetune/ga_rpn", finetune, train_detector.TrainDetectorConfig(spec, DETECTORS.finetune_schedule()),
         ["data", "proposals/ga_rpn", "train_detector/ga_faster_rcnn"])
    step("eval_detector/finetune_ga_rpn", eval_detector, eval_detector.EvalDetectorConfig(spec, SHARDS),
         ["finetune/ga_rpn", "data", "proposals/ga_rpn"])
    return nodes


def test_data_stage(chain):
    _, out, result = chain["data"]
    assert result.metrics["num_train_images"] == 8 and result.metrics["num_val_images"] == 4
    assert result.metrics["num_val_skipped_boxes"] == 0
    splits = result.outputs["splits"]
    assert (out.dir / splits["val"]["ann_file"]).is_file() and (out.dir / splits["train"]["image_root"]).is_dir()


def test_train_stage(chain):
    _, out, result = chain["train/ga_rpn"]
    assert (out.dir / "model.pt").is_file() and result.outputs["epochs"] == 1
    history = json.loads((out.dir / "history.json").read_text())
    assert len(history) == 1 and {"loss_anchor_loc", "loss_anchor_shape", "loss_objectness"} <= set(history[0])
    assert np.isfinite(result.metrics["loss"]) and "loss_anchor_shape" in result.logged
    assert set(result.artifacts) == {"model.pt", "history.json"}


def test_proposals_stage(chain):
    _, out, result = chain["proposals/ga_rpn"]
    cache = ProposalCache(out.dir / result.outputs["caches"]["val"])
    assert sorted(cache.image_ids()) == [1, 2, 3, 4] and len(list((out.dir / "cache" / "val").glob("*.parquet"))) == 2
    train = ProposalCache(out.dir / result.outputs["caches"]["train"])  # for the detectors trained on proposals
    assert sorted(train.image_ids()) == list(range(1, 9)) and len(list((out.dir / "cache" / "train").glob("*.parquet"))) == 2
    boxes, scores, _ = cache.get(1)
    assert boxes.shape[1] == 4 and (np.diff(scores) <= 0).all()
    assert (boxes[:, 2] <= 128).all() and (boxes[:, 3] <= 128).all()  # original image pixels
    assert result.metrics["num_images"] == 4 and result.metrics["anchors_per_image"] > 0


def test_eval_proposals_stage(chain):
    _, out, result = chain["eval_proposals/ga_rpn"]
    for name in ("AR_100", "AR_300", "AR_1000"):
        assert 0.0 <= result.metrics[name] <= 1.0
    assert result.metrics["AR_100"] <= result.metrics["AR_300"] <= result.metrics["AR_1000"]
    for plot in eval_proposals.PLOTS:
        assert (out.dir / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out.dir / "metrics.json").read_text())["AR_1000"] == pytest.approx(result.metrics["AR_1000"])
    # the single-IoU recalls at 1000 proposals, from the curves; the boxes the model output per image
    curves = json.loads((out.dir / "curves.json").read_text())
    assert result.metrics["recall_iou50"] == curves["recall_vs_proposals"]["0.50"][-1] >= result.metrics["recall_iou70"]
    # AR@1000 per ground-truth aspect-ratio bin: each in [0, 1] (or nan), the pooled AR_1000 at most the best bin's
    bins = [result.metrics[f"AR_1000_{name}"] for name in ("tall", "square", "wide")]
    assert all(0.0 <= b <= 1.0 for b in bins if not math.isnan(b)) and result.metrics["AR_1000"] <= max(bins) + 1e-9
    cache = ProposalCache(chain["proposals/ga_rpn"][1].dir / chain["proposals/ga_rpn"][2].outputs["caches"]["val"])
    counts = [len(boxes) for boxes, _, _ in cache.read_all().values()]
    assert result.metrics["proposals_per_image"] == pytest.approx(sum(counts) / len(counts)) and 0 < max(counts) <= 1000


def test_detector_stages(chain):
    for variant in ("fast_rcnn_ga_rpn", "ga_faster_rcnn", "ga_retinanet"):
        _, out, result = chain[f"train_detector/{variant}"]
        assert (out.dir / "model.pt").is_file() and result.outputs["num_classes"] == 6  # category ids 1..5
        assert np.isfinite(result.metrics["loss"])
    assert {"loss_anchor_loc", "loss_anchor_shape", "classification"} <= set(chain["train_detector/ga_retinanet"][2].metrics)
    _, out, result = chain["finetune/ga_rpn"]
    history = json.loads((out.dir / "history.json").read_text())
    assert [h["lr"] for h in history] == pytest.approx([0.01, 0.001])  # / 10 after each epoch
    assert set(history[0]) >= {"loss_classifier", "loss_box_reg"} and "loss_objectness" not in history[0]  # its RPN is gone
    for variant in ("fast_rcnn_ga_rpn", "ga_faster_rcnn", "ga_retinanet", "finetune_ga_rpn"):
        _, out, result = chain[f"eval_detector/{variant}"]
        assert set(result.metrics) >= {"AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L", "seconds_per_image"}
        assert all(np.isnan(v) or 0 <= v <= 1 for k, v in result.metrics.items() if k.startswith("AP"))
        table = pq.read_table(out.dir / result.outputs["detections"])
        assert table.column_names == ["image_id", "x1", "y1", "x2", "y2", "score", "category_id"]
        assert set(table.column("image_id").to_pylist()) <= {1, 2, 3, 4}
        assert (table.column("x2").to_numpy() <= 128).all()  # original image pixels


def test_only_names_the_missing_stage():
    with pytest.raises(ValueError, match="stage 'data'"):
        proposals.run(None, {}, None, LocalExecutor())


def test_only_picks_one_input_by_stage_and_variant():
    inputs = {n: local_input(n, "/nowhere") for n in ("data", "train/rpn", "train/ga_rpn", "finetune/rpn")}
    assert only(inputs, "train", "ga_rpn").node_id == "train/ga_rpn"
    assert only(inputs, ("train_detector", "finetune")).node_id == "finetune/rpn"
    assert only(inputs, "proposals", required=False) is None
    with pytest.raises(ValueError, match=r"stage 'train', got \['train/rpn', 'train/ga_rpn'\]"):
        only(inputs, "train")
    with pytest.raises(ValueError, match=r"stage 'proposals' \(variant 'rpn'\), got \[\]"):
        only(inputs, "proposals", "rpn")
    with pytest.raises(ValueError, match="got"):  # several are an error even when the input is optional
        only(inputs, "train", required=False)
