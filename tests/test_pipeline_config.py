"""Pipeline config: presets, typed --set overrides, validation errors naming the key."""

import dataclasses

import pytest

from pipeline.config import (
    ConfigError,
    PipelineConfig,
    apply_override,
    build_config,
    flatten,
    load_preset,
    preset_names,
    resolve,
    to_dict,
)


def test_presets_load_and_round_trip():
    assert {"default", "smoke", "coco_r50"} <= set(preset_names())
    for name in ("default", "smoke", "coco_r50"):
        cfg = resolve(name)
        assert isinstance(cfg, PipelineConfig)
        assert build_config(to_dict(cfg)) == cfg  # the saved resolved config reloads to the same thing


def test_preset_values_match_their_purpose():
    smoke, coco = resolve("smoke"), resolve("coco_r50")
    assert smoke.data.synthetic_sizes() == {"num_train": 8, "num_val": 4, "image_size": 128}
    assert not smoke.proposer.pretrained_backbone and not smoke.train.use_gpu
    assert coco.proposer_for("ga_rpn").backbone == "resnet50"
    assert (coco.proposer.min_size, coco.proposer.max_size) == (800, 1333)
    assert coco.train.lr == 0.02 and coco.train.num_workers * coco.train.batch_size == 16
    assert coco.train.lr_steps == (8, 11) and coco.train.epochs == 12 and coco.train.warmup_iters == 500
    assert coco.train.use_gpu and coco.train.grad_clip == 35.0


def test_variant_sets_kind():
    cfg = resolve("smoke")
    rpn, ga = cfg.proposer_for("rpn"), cfg.proposer_for("ga_rpn")
    assert (rpn.kind, ga.kind) == ("rpn", "ga_rpn")
    assert (ga.min_size, ga.max_size) == (rpn.min_size, rpn.max_size) == (128, 128)
    with pytest.raises(ConfigError, match="unknown variant"):
        cfg.proposer_for("retina")


def test_overrides_are_typed():
    cfg = resolve("smoke", ["train.epochs=3", "train.lr=1", "train.lr_steps=[2]", "proposer.use_shape=false",
                            "proposer.adaption=plain_deform", "data.num_train=5"])
    assert cfg.train.epochs == 3
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.lr_steps == (2,)
    assert cfg.proposer.use_shape is False and cfg.proposer.adaption == "plain_deform"
    assert cfg.data.synthetic_sizes()["num_train"] == 5


def test_numbers_in_exponent_notation_are_numbers():
    assert resolve("smoke", ["train.lr=1e-3"]).train.lr == 0.001  # YAML 1.1 alone would read a string
    assert resolve("smoke", ["train.lr=2E2"]).train.lr == 200.0
    with pytest.raises(ConfigError, match="train.lr: expected a number, got 'fast'"):
        resolve("smoke", ["train.lr=fast"])
    with pytest.raises(ConfigError, match="train.lr: expected a finite number, got inf"):
        resolve("smoke", ["train.lr=inf"])


@pytest.mark.parametrize("override, message", [
    ("train.epoch=3", "unknown config key 'train.epoch'"),
    ("trian.epochs=3", "unknown config key 'trian'"),
    ("train.epochs=two", "train.epochs: expected an integer, got 'two'"),
    ("train.epochs=1.5", "train.epochs: expected an integer"),
    ("train.use_gpu=1", "train.use_gpu: expected true/false"),
    ("train.lr_steps=5", "train.lr_steps: expected a list"),
    ("train.epochs=0", "train.epochs must be > 0"),
    ("train.lr=.inf", "train.lr: expected a finite number, got inf"),
    ("proposer.loc_threshold=.nan", "proposer.loc_threshold: expected a finite number, got nan"),
    ("proposer.kind=rpn", "proposer.kind: not configurable here"),
    ("data.min_size=512", "data.min_size: moved to proposer.min_size"),
    ("proposer.approx_samples=4", "proposer.approx_samples=4"),
    ("data.synthetic=huge", "data.synthetic: unknown size 'huge'"),
    ("data.synthetic=null", "data.train_ann: required"),
    ("train=3", "train: expected a mapping"),
    ("noequals", "expected KEY=VALUE"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        resolve("smoke", [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_broken_and_missing_presets(tmp_path):
    with pytest.raises(ConfigError, match="no such preset"):
        load_preset("nonexistent")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: [1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+: not valid YAML"):
        load_preset(str(bad))
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_preset(str(scalar))


def test_preset_file_path_and_override_into_new_section(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\ndata: {synthetic: smoke}\nproposer: {min_size: 64, max_size: 64}\n")
    raw = load_preset(str(path))
    apply_override(raw, "train.epochs=1")
    cfg = build_config(raw)
    assert cfg.name == "mine" and cfg.train.epochs == 1 and cfg.proposer_for("rpn").min_size == 64


def test_flatten_and_frozen():
    cfg = resolve("smoke")
    flat = flatten(to_dict(cfg))
    assert flat["train.epochs"] == 2 and flat["proposer.backbone"] == "tiny" and flat["data.synthetic"] == "smoke"
    assert "proposer.kind" not in flat
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.epochs = 5
