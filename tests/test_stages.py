"""Every stage through its one entry point ``run(cfg, inputs, out, executor)``, directly, without
Ray or MLflow: the smoke chain data -> train -> proposals -> eval_proposals -> report with a
``LocalExecutor``, each stage reading only what the previous ones returned."""

import json

import numpy as np
import pytest

from ga_models import ProposerConfig
from stages import data, eval_proposals, proposals, report, train_proposer
from stages.contract import LocalExecutor, StageResult, local_input, local_output
from stages.data import DataConfig
from stages.proposal_cache import ProposalCache
from stages.train_proposer import TrainConfig

PROPOSER = ProposerConfig(kind="ga_rpn", min_size=128, max_size=128, fpn_channels=16)
TRAIN = TrainConfig(epochs=1, batch_size=4, lr=0.01, warmup_iters=1, lr_steps=())


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
    step("train/ga_rpn", train_proposer, train_proposer.TrainProposerConfig(PROPOSER, TRAIN), ["data"])
    step("proposals/ga_rpn", proposals, proposals.ProposalsStageConfig(PROPOSER, proposals.ProposalsConfig(2, 2)),
         ["train/ga_rpn", "data"])
    step("eval_proposals/ga_rpn", eval_proposals, eval_proposals.EvalProposalsConfig("GA-RPN"),
         ["proposals/ga_rpn", "data"])
    step("report", report, report.ReportConfig(DataConfig(synthetic="smoke"), PROPOSER, TRAIN), ["eval_proposals/ga_rpn"])
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
    cache = ProposalCache(out.dir / result.outputs["cache"])
    assert sorted(cache.image_ids()) == [1, 2, 3, 4] and len(list((out.dir / "cache").rglob("*.parquet"))) == 2
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


def test_report_stage(chain):
    _, out, result = chain["report"]
    text = (out.dir / "report.md").read_text()
    assert "| GA-RPN (measured) |" in text and "synthetic 'smoke' val set" in text
    assert all((out.dir / p).is_file() for p in (f"plots/ga_rpn_{name}" for name in eval_proposals.PLOTS))
    assert result.metrics == {}  # gaps need both variants


def test_only_names_the_missing_stage():
    with pytest.raises(ValueError, match="stage 'data'"):
        proposals.run(None, {}, None, LocalExecutor())
