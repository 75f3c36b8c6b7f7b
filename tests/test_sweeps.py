"""The sweep grids and their expansion, ``--grid`` validation, trial planning (configs, cache keys,
target nodes), the aggregate over seeds and the sweep table: no Ray, no MLflow."""

import pytest

from pipeline.__main__ import main
from pipeline.config import ConfigError, resolve
from pipeline.dag import build_dag, cache_keys
from pipeline.sweeps.grids import SWEEPS, adhoc_sweep, describe, expand, parse_grid, with_axes
from pipeline.sweeps.table import DONE, FAILED, PlannedTrial, aggregate, render, table_rows
from pipeline.sweeps.tune import plan_trials


def params(name, *keys):
    return [tuple(t.params[k] for k in keys) for t in expand(SWEEPS[name], 0)]


def test_every_named_grid_expands_to_its_documented_trials():
    assert params("eps_l", "loc_threshold") == [(0.0,), (0.01,), (0.05,), (0.1,), (0.2,)]
    assert params("samples", "approx_samples") == [(3,), (9,), (15,)]
    assert params("modules", "modules", "proposer") == [
        ("RPN", "rpn"), ("L", "ga_rpn"), ("S", "ga_rpn"), ("L+S", "ga_rpn"), ("L+S+F.A.", "ga_rpn")]
    assert params("modules", "use_location", "use_shape", "use_feature_adaption") == [(False, False, False),
        (True, False, False), (False, True, False), (True, True, False), (True, True, True)]
    assert params("alignment", "center_alignment", "use_feature_adaption") == [
        (False, False), (True, False), (False, True), (True, True), (True, True)]
    assert [t.values.get("proposer.adaption") for t in expand(SWEEPS["alignment"], 0)][-1] == "plain_deform"
    # sigma1 < sigma2 of {0.1, 0.2, 0.5} x {0.2, 0.5, 1.0}: 6 of the 9 pairs
    assert params("sigma", "center_ratio", "ignore_ratio") == [
        (0.1, 0.2), (0.1, 0.5), (0.1, 1.0), (0.2, 0.5), (0.2, 1.0), (0.5, 1.0)]
    # the paper's lambda2, run as shape_weight = 10 x lambda2
    assert params("lambda2", "lambda2", "shape_weight") == [(0.02, 0.2), (0.05, 0.5), (0.1, 1.0), (0.2, 2.0)]
    table7 = params("proposals", "proposer", "num_proposals", "rcnn_iou")
    assert len(table7) == 8 and set(table7) == {(p, n, i) for p in ("rpn", "ga_rpn") for n in (300, 1000) for i in (0.5, 0.6)}
    assert params("table1", "table1", "proposer") == [("RPN", "rpn"), ("RPN + 9 anchors", "rpn"), ("GA-RPN", "ga_rpn")]
    assert [t.values.get("proposer.rpn_anchor_scales") for t in expand(SWEEPS["table1"], 0)] == [None, 3, None]
    assert [len(expand(s, 0)) for s in SWEEPS.values()] == [3, 5, 3, 5, 5, 6, 4, 8, 7]
    fidelity = {t.point: t.values for t in expand(SWEEPS["fidelity"], 0)}
    assert list(fidelity) == ["preset", "centre", "shape_norm", "beta", "centre+beta", "all", "all+K15"]
    assert fidelity["preset"] == {"detector.variants": [], "detector.finetune": [], "proposer.anchor_center_offset": 0.5,
                                  "proposer.location_targets_follow_offset": False, "proposer.shape_loss_norm": "positives",
                                  "proposer.ga_reg_beta": 1 / 9, "proposer.approx_samples": 9}  # before issue 11, whatever the preset says
    assert fidelity["all+K15"] == {**fidelity["all"], "proposer.approx_samples": 15}
    assert fidelity["centre+beta"] == {**fidelity["all"], "proposer.shape_loss_norm": "positives"}
    assert {k for k in fidelity["all"] if k.startswith("proposer.")} == {
        "proposer.anchor_center_offset", "proposer.location_targets_follow_offset", "proposer.shape_loss_norm",
        "proposer.ga_reg_beta", "proposer.approx_samples"}
    listing = describe()
    assert all(f"  {name:<10}" in listing for name in SWEEPS) and " 8 trials  Fast R-CNN" in listing


def test_trials_carry_their_config_and_the_papers_numbers():
    trials = expand(SWEEPS["proposals"], 0)
    rpn_300_06 = next(t for t in trials if t.params == {"proposer": "rpn", "num_proposals": 300, "rcnn_iou": 0.6, "seed": 0})
    assert rpn_300_06.paper == {"AP": 37.0}
    cfg = resolve("default", [], dict(rpn_300_06.values))
    assert cfg.detector.variants == ("fast_rcnn_rpn",) and cfg.detector.finetune == ()
    rcnn = cfg.detector_for("fast_rcnn_rpn").rcnn
    assert (rcnn.proposals_train, rcnn.proposals_test, rcnn.iou) == (300, 300, 0.6)
    eps = expand(SWEEPS["eps_l"], 0)
    assert eps[2].paper["anchors_per_image"] == 5251 and eps[4].paper is None  # 0.2 is not in Table 5
    assert expand(SWEEPS["modules"], 0)[0].paper["AR_1000"] == 59.4
    assert [t.paper["AR_1000"] for t in expand(SWEEPS["samples"], 0)] == [68.3, 68.5, 68.5]
    assert [t.paper["AR_1000"] for t in expand(SWEEPS["lambda2"], 0)] == [68.3, 68.4, 68.5, 68.4]


def test_seeds_repeat_every_point_with_its_own_training_seed():
    trials = expand(SWEEPS["samples"], base_seed=5, seeds=3)
    assert len(trials) == 9 and [t.index for t in trials] == list(range(9))
    first = trials[:3]
    assert {t.point for t in first} == {"approx_samples=3"} and [t.seed for t in first] == [5, 6, 7]
    assert all(t.values["train.seed"] == t.seed == t.values["detector.train.seed"] == t.params["seed"] for t in first)
    # without --seeds the config's own seed is the trial's, and nothing is overridden
    single = expand(SWEEPS["samples"], base_seed=5)
    assert [t.seed for t in single] == [5, 5, 5] and all("train.seed" not in t.values for t in single)


def test_planned_trials_reuse_what_they_share_and_target_the_swept_node():
    base = resolve("default")
    eps = plan_trials(SWEEPS["eps_l"], expand(SWEEPS["eps_l"], 0), "default", [], base)
    assert all(p.targets == ("eval_proposals/ga_rpn",) for p in eps)
    # inference only: one trained GA-RPN for all five; the proposals differ
    assert len({p.keys["train/ga_rpn"] for p in eps}) == 1
    assert len({p.keys["proposals/ga_rpn"] for p in eps}) == 5 and len({p.key for p in eps}) == 5
    assert all("train_detector/fast_rcnn_rpn" not in p.keys for p in eps)  # no detector in a proposal sweep

    modules = plan_trials(SWEEPS["modules"], expand(SWEEPS["modules"], 0), "default", [], base)
    assert [p.targets[0] for p in modules] == ["eval_proposals/rpn"] + ["eval_proposals/ga_rpn"] * 4
    assert len({p.keys["train/rpn"] for p in modules}) == 1  # the GA switches never re-key the baseline

    # Table 1 with seeds: seed 0 reuses the models `pipeline full` trained; 9 anchors is its own baseline
    full = cache_keys(base, build_dag(base))
    table1 = plan_trials(SWEEPS["table1"], expand(SWEEPS["table1"], 0, seeds=2), "default", [], base)
    assert [(p.trial.point, p.targets[0]) for p in table1][::2] == [
        ("RPN", "eval_proposals/rpn"), ("RPN + 9 anchors", "eval_proposals/rpn"), ("GA-RPN", "eval_proposals/ga_rpn")]
    assert table1[0].keys["train/rpn"] == full["train/rpn"] and table1[4].keys["train/ga_rpn"] == full["train/ga_rpn"]
    assert len({p.keys["train/rpn"] for p in table1[:4]}) == 4  # two seeds x two anchor settings

    # the fidelity fixes: seven GA-RPN trainings, "centre+beta" the default preset's with K = 9 (its K until
    # the K = 15 seeds chose otherwise); never the RPN's
    fixes = plan_trials(SWEEPS["fidelity"], expand(SWEEPS["fidelity"], 0), "default", [], base)
    k9 = resolve("default", ["proposer.approx_samples=9"])
    assert fixes[4].keys["train/ga_rpn"] == cache_keys(k9, build_dag(k9))["train/ga_rpn"] != full["train/ga_rpn"]
    assert {p.targets for p in fixes} == {("eval_proposals/ga_rpn",)}
    assert len({p.keys["train/ga_rpn"] for p in fixes}) == 7 and "train/rpn" not in {n for p in fixes for n in p.targets}

    table7 = plan_trials(SWEEPS["proposals"], expand(SWEEPS["proposals"], 0), "default", [], base)
    assert {p.targets[0] for p in table7} == {"eval_detector/fast_rcnn_rpn", "eval_detector/fast_rcnn_ga_rpn"}
    for proposer in ("rpn", "ga_rpn"):  # the four trials of a proposer read one cache of its proposals
        arm = [p for p in table7 if p.trial.params["proposer"] == proposer]
        assert len({p.keys[f"proposals/{proposer}"] for p in arm}) == 1 and len({p.key for p in arm}) == 4


def test_adhoc_grid_targets_the_evaluations_it_changes():
    base = resolve("smoke", ["detector.variants=[]", "detector.finetune=[]"])
    sweep = adhoc_sweep(["proposer.center_ratio=0.1,0.3"])
    planned = plan_trials(sweep, expand(sweep, 0), "smoke", ["detector.variants=[]", "detector.finetune=[]"], base)
    assert [p.targets for p in planned] == [("eval_proposals/ga_rpn",)] * 2
    assert [dict(p.trial.params) for p in planned] == [{"center_ratio": 0.1, "seed": 0}, {"center_ratio": 0.3, "seed": 0}]
    both = adhoc_sweep(["proposer.nms_thresh=0.6,0.8"])
    planned = plan_trials(both, expand(both, 0), "smoke", ["detector.variants=[]", "detector.finetune=[]"], base)
    assert planned[0].targets == ("eval_proposals/rpn", "eval_proposals/ga_rpn")
    with pytest.raises(ConfigError, match=r"--grid log_every: changes no evaluated result"):
        nothing = adhoc_sweep(["train.log_every=5,7"])
        plan_trials(nothing, expand(nothing, 0), "smoke", [], resolve("smoke"))


@pytest.mark.parametrize("spec, message", [
    ("proposer.loc_thresold=0,0.1", "unknown config key 'proposer.loc_thresold'"),
    ("proposer.loc_threshold=0,2", "proposer.loc_threshold"),
    ("train.epochs=2,two", "train.epochs: expected an integer, got 'two'"),
])
def test_grid_values_are_validated_like_set_and_name_the_key(spec, message):
    sweep = adhoc_sweep([spec])
    with pytest.raises(ConfigError, match="sweep trial") as error:
        plan_trials(sweep, expand(sweep, 0), "smoke", [], resolve("smoke"))
    assert message in str(error.value)


def test_grid_specs_parse_yaml_values_and_reject_malformed_ones():
    assert parse_grid("proposer.loc_threshold=0,0.05") == ("proposer.loc_threshold", [0, 0.05])
    assert parse_grid("train.lr_steps=[3],[2, 3]") == ("train.lr_steps", [[3], [2, 3]])
    assert parse_grid("proposer.use_shape=true,false") == ("proposer.use_shape", [True, False])
    for spec, message in (("loc_threshold", "expected KEY=VALUE"), ("proposer.approx_samples=", "no values"),
                          ("proposer.approx_samples=3,3", "repeated values"), ("train.lr_steps=[3", "cannot parse")):
        with pytest.raises(ConfigError, match=message):
            parse_grid(spec)
    with pytest.raises(ConfigError, match="given more than once"):
        adhoc_sweep(["train.lr=0.1,0.2", "train.lr=0.3,0.4"])
    with pytest.raises(ConfigError, match="already an axis of sweep 'eps_l'"):
        with_axes(SWEEPS["eps_l"], ["proposer.loc_threshold=0.3,0.4"])
    # axes sharing a last name keep their full keys as params
    assert [a.name for a in adhoc_sweep(["train.seed=1,2", "data.seed=1,2"]).axes] == ["train.seed", "data.seed"]
    assert len(expand(with_axes(SWEEPS["eps_l"], ["proposer.nms_thresh=0.6,0.7"]), 0)) == 10


def test_aggregate_is_mean_and_sample_std_over_seeds():
    out = aggregate([{"AR_1000": 0.4, "only_here": 1.0}, {"AR_1000": 0.5}, {"AR_1000": 0.6}])
    assert out == pytest.approx({"AR_1000": 0.5, "AR_1000_std": 0.1})
    assert aggregate([{"AP": 0.3}]) == {"AP": 0.3, "AP_std": 0.0}
    assert aggregate([]) == {}


def test_table_pools_seeds_and_puts_the_paper_beside():
    trials = expand(SWEEPS["eps_l"], 0, seeds=2)
    planned = [PlannedTrial(t, None, {}, ("eval_proposals/ga_rpn",), f"k{t.index}") for t in trials]
    for p, ar in zip(planned[:4], (0.40, 0.42, 0.50, 0.50)):
        p.state, p.metrics = DONE, {"AR_1000": ar, "anchors_per_image": 1000.0}
    planned[4].state, planned[4].error = FAILED, "TrialFailed: proposals/ga_rpn: ValueError: boom"
    rows = table_rows(SWEEPS["eps_l"], planned, seeds=2)
    assert rows[0]["point"] == "loc_threshold=0.0" and rows[0]["seeds"] == "2/2"
    assert rows[0]["AR_1000"] == "41.0 ± 1.4" and rows[0]["anchors_per_image"] == "1000 ± 0"
    assert rows[0]["paper AR100/AR300/AR1000/anchors/img"] == "59.2 / 65.2 / 68.5 / 75583"
    assert rows[2]["seeds"] == "0/2" and rows[2]["AR_1000"] == "-" and rows[2]["error"].startswith("TrialFailed")
    text, markdown = render(rows), render(rows, markdown=True)
    assert text.splitlines()[0].split() == ["point", "state", "seeds", "AR100", "AR300", "AR1000", "ARS", "ARM", "ARL",
                                            "anchors/img", "s/img", "paper", "AR100/AR300/AR1000/anchors/img", "error"]
    assert markdown.splitlines()[1].startswith("|---") and "41.0 ± 1.4" in markdown


def test_cli_lists_sweeps_and_rejects_bad_requests(capsys):
    assert main(["sweep", "--list"]) == 0
    out = capsys.readouterr().out
    assert "eps_l" in out and "5 trials" in out and "proposals" in out
    for argv, message in ((["sweep"], "name a sweep"), (["sweep", "nope"], "no such sweep (sweeps: table1, eps_l"),
                          (["sweep", "eps_l", "--seeds", "0"], "--seeds 0: must be >= 1"),
                          (["sweep", "--grid", "proposer.nope=1,2"], "unknown config key 'proposer.nope'")):
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err


def test_trial_drivers_reserve_no_cpu_by_default():
    """A trial's driver only waits on its stages: reserving even 0.01 CPU each left two trials'
    1-CPU training workers without a second whole core on this 2-core machine."""
    assert resolve("default").sweep.trial_resources() == {"CPU": 0.0, "GPU": 0.0, "memory": 256 * 2**20}
    for override, key in (("sweep.trial_memory_mb=0", "sweep.trial_memory_mb"),
                          ("sweep.max_concurrent_trials=0", "sweep.max_concurrent_trials"),
                          ("sweep.trial_cpus=-1", "sweep.trial_cpus")):
        with pytest.raises(ConfigError, match=key):
            resolve("default", [override])
