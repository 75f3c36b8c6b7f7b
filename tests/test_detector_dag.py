"""The detector half of the DAG: which nodes the config asks for, what each reads (by cache
key), and that the paper's preset plans every detector node."""

import pytest

from pipeline.config import ConfigError, resolve
from pipeline.dag import build_dag, cache_keys, config_slice, make_plan
from pipeline.store import ArtifactStore
from stages.common.variants import DETECTORS

DETECTOR_NODES = [f"train_detector/{v}" for v in DETECTORS] + ["finetune/rpn", "finetune/ga_rpn"] + [
    f"eval_detector/{v}" for v in (*DETECTORS, "finetune_rpn", "finetune_ga_rpn")]


def test_smoke_dag_has_every_detector_node_with_its_inputs():
    cfg = resolve("smoke")
    dag = build_dag(cfg)
    assert [n for n in dag if n.split("/")[0] in ("train_detector", "finetune", "eval_detector")] == DETECTOR_NODES
    assert dag["train_detector/fast_rcnn_ga_rpn"].deps == ("data", "proposals/ga_rpn", "train/rpn")
    assert dag["train_detector/fast_rcnn_rpn"].deps == ("data", "proposals/rpn", "train/rpn")
    assert dag["train_detector/ga_faster_rcnn"].deps == ("data", "train/rpn")  # backbone from the RPN baseline
    assert dag["finetune/ga_rpn"].deps == ("data", "proposals/ga_rpn", "train_detector/faster_rcnn")
    assert dag["eval_detector/finetune_ga_rpn"].deps == ("finetune/ga_rpn", "data", "proposals/ga_rpn")
    assert dag["eval_detector/retinanet"].deps == ("train_detector/retinanet", "data")
    # the proposers' caches cover the train split only where a detector trains on them
    assert config_slice(cfg, dag["proposals/ga_rpn"]).splits == ("val", "train")
    assert config_slice(resolve("smoke", ["detector.variants=[faster_rcnn]", "detector.finetune=[]"]),
                        dag["proposals/ga_rpn"]).splits == ("val",)


def test_finetune_consumes_the_ga_rpn_cache_by_key():
    cfg = resolve("smoke")
    dag = build_dag(cfg)
    keys = cache_keys(cfg, dag)
    # an inference-only setting makes new proposal caches: the fine-tunes and their evaluations follow
    # them, the trained models upstream (proposers, the Faster R-CNN they start from) do not
    cfg2 = resolve("smoke", ["proposer.loc_threshold=0.2"])
    keys2 = cache_keys(cfg2, build_dag(cfg2))
    changed = {n for n in keys if keys[n] != keys2[n]}
    assert {"proposals/ga_rpn", "finetune/ga_rpn", "eval_detector/finetune_ga_rpn", "train_detector/fast_rcnn_ga_rpn"} <= changed
    assert not changed & {"train/ga_rpn", "train/rpn", "train_detector/faster_rcnn", "train_detector/retinanet"}


def test_settings_rekey_only_the_detectors_that_use_them():
    def changed(*overrides):
        cfg = resolve("smoke", list(overrides))
        base = cache_keys(resolve("smoke"), build_dag(resolve("smoke")))
        new = cache_keys(cfg, build_dag(cfg))
        return {n for n in base if base[n] != new[n]}

    guided = changed("detector.guided.iou=0.7")
    assert guided == {"train_detector/fast_rcnn_ga_rpn", "train_detector/ga_faster_rcnn", "finetune/ga_rpn",
                      "eval_detector/fast_rcnn_ga_rpn", "eval_detector/ga_faster_rcnn", "eval_detector/finetune_ga_rpn"}
    # proposals at test time are an inference setting: evaluations only
    assert changed("detector.baseline.proposals_test=500") == {
        "eval_detector/fast_rcnn_rpn", "eval_detector/faster_rcnn", "eval_detector/finetune_rpn"}
    assert changed("detector.retina_octave_base_scale=3") == {
        "train_detector/retinanet", "train_detector/ga_retinanet", "eval_detector/retinanet", "eval_detector/ga_retinanet"}
    assert changed("detector.train.log_every=3", "detector.train.cpus_per_worker=0.5") == set()


def test_backbone_init_none_and_variant_selection():
    cfg = resolve("smoke", ["detector.backbone_init=none", "detector.variants=[retinanet, ga_retinanet]", "detector.finetune=[]"])
    dag = build_dag(cfg)
    assert dag["train_detector/ga_retinanet"].deps == ("data",)
    assert [n for n in dag if "detector" in n] == ["train_detector/retinanet", "train_detector/ga_retinanet",
                                                   "eval_detector/retinanet", "eval_detector/ga_retinanet"]


@pytest.mark.parametrize("overrides, message", [
    (["detector.variants=[retinanet]"], "detector.finetune needs 'faster_rcnn'"),
    (["detector.variants=[yolo]"], "detector.variants: unknown"),
    (["detector.finetune=[rpn, rpn]"], "detector.finetune: expected distinct"),
    (["detector.guided.iou=1.5"], "iou must be in"),
    (["detector.backbone_init=imagenet"], "detector.backbone_init"),
    (["detector.train.epochs=0"], "epochs must be > 0"),
])
def test_bad_detector_settings_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        resolve("smoke", overrides)


def test_coco_r50_resolves_with_the_paper_settings_and_plans_every_detector_node(tmp_path):
    (tmp_path / "annotations").mkdir()
    for split in ("train2017", "val2017"):  # the plan reads only the annotation files' stats
        (tmp_path / "annotations" / f"instances_{split}.json").write_text('{"images": [], "annotations": [], "categories": []}')
    cfg = resolve("coco_r50", [f"data.root={tmp_path}"])
    assert cfg.detector_for("ga_faster_rcnn").rcnn.iou == 0.6 and cfg.detector_for("ga_faster_rcnn").rcnn.proposals_test == 300
    assert cfg.detector_for("faster_rcnn").rcnn.iou == 0.5 and cfg.detector_for("faster_rcnn").rcnn.rois_per_image == 512
    assert cfg.detector_for("ga_retinanet").retina_octave_base_scale == 4.0
    assert cfg.detector.train.epochs == 12 and cfg.detector.train.lr_steps == (8, 11)
    assert cfg.detector.finetune_schedule().lr_steps == (1, 2) and cfg.detector.finetune_schedule().epochs == 3
    dag = build_dag(cfg)
    plan = make_plan(dag, cache_keys(cfg, dag), ArtifactStore(tmp_path / "store"), list(dag))
    planned = {s.node.id for s in plan if s.run}
    assert set(DETECTOR_NODES) <= planned and "train/rpn" not in dag["train_detector/faster_rcnn"].deps
