"""Cache keys re-key exactly the downstream nodes (config and code, the code part derived from
the stage modules' imports); the plan reuses complete nodes only; the artifact store's manifest
is the commit point."""

import json
import shutil
import subprocess
import sys

import pytest

from pipeline.code_hash import PROJECT_PACKAGES, ROOT, import_closure
from pipeline.config import resolve
from pipeline.dag import CACHED, FORCED, RERUN, build_dag, cache_keys, descendants, make_plan
from pipeline.stage_table import STAGES
from pipeline.store import MANIFEST, ArtifactStore, StoreError

ALL = ["data", "train/rpn", "train/ga_rpn", "proposals/rpn", "proposals/ga_rpn",
       "eval_proposals/rpn", "eval_proposals/ga_rpn", "visualize"]
# The proposal half of the DAG: the tests below that do not concern the detectors leave them out.
NO_DETECTORS = ["detector.variants=[]", "detector.finetune=[]"]
CFG = resolve("smoke", NO_DETECTORS)


def build(*overrides, proposers=None):
    return build_dag(resolve("smoke", [*NO_DETECTORS, *overrides]), proposers)


def keys_for(*overrides):
    cfg = resolve("smoke", [*NO_DETECTORS, *overrides])
    return cache_keys(cfg, build_dag(cfg))


def changed(*overrides):
    base, new = keys_for(), keys_for(*overrides)
    return {n for n in base if base[n] != new[n]}


def test_dag_shape():
    dag = build()
    assert list(dag) == ALL
    assert dag["train/ga_rpn"].deps == ("data",)
    assert dag["proposals/rpn"].deps == ("train/rpn", "data")
    assert dag["visualize"].deps == ("data", "train/rpn", "train/ga_rpn", "proposals/rpn", "proposals/ga_rpn")
    assert descendants(dag, {"train/rpn"}) == {"train/rpn", "proposals/rpn", "eval_proposals/rpn", "visualize"}
    # the figures need both models: one variant's branch leaves them out
    assert list(build(proposers=("ga_rpn",))) == ["data", "train/ga_rpn", "proposals/ga_rpn", "eval_proposals/ga_rpn"]


def test_keys_are_stable_and_distinct():
    a, b = keys_for(), keys_for()
    assert a == b
    assert len(set(a.values())) == len(a)


@pytest.mark.parametrize("override, expected", [
    # a data setting re-keys everything
    ("data.seed=1", set(ALL)),
    # a training setting re-keys both branches from training on, not the data
    ("train.epochs=3", set(ALL) - {"data"}),
    # a model setting shared by both variants
    ("proposer.fpn_channels=64", set(ALL) - {"data"}),
    # an inference-only GA setting keeps the trained models and the RPN baseline's branch
    ("proposer.loc_threshold=0.05", {"proposals/ga_rpn", "eval_proposals/ga_rpn", "visualize"}),
    # a GA-only training setting re-keys the GA branch only (the baseline carries its default)
    ("proposer.center_ratio=0.3", {"train/ga_rpn", "proposals/ga_rpn", "eval_proposals/ga_rpn", "visualize"}),
    # each variant's own box-loss beta re-keys its branch only
    ("proposer.ga_reg_beta=0.5", {"train/ga_rpn", "proposals/ga_rpn", "eval_proposals/ga_rpn", "visualize"}),
    ("proposer.rpn_reg_beta=0.5", {"train/rpn", "proposals/rpn", "eval_proposals/rpn", "visualize"}),
    ("proposer.shape_loss_norm=positives", {"train/ga_rpn", "proposals/ga_rpn", "eval_proposals/ga_rpn", "visualize"}),
    # an inference setting both variants read
    ("proposer.nms_thresh=0.6", {"proposals/rpn", "eval_proposals/rpn", "proposals/ga_rpn",
                                 "eval_proposals/ga_rpn", "visualize"}),
    ("proposals.batch_size=1", {"proposals/rpn", "eval_proposals/rpn", "proposals/ga_rpn",
                                "eval_proposals/ga_rpn", "visualize"}),
    # settings that cannot change any result re-key nothing
    ("train.max_failures=3", set()),
    ("train.log_every=7", set()),
])
def test_changing_one_setting_rekeys_exactly_downstream(override, expected):
    assert changed(override) == expected


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory):
    """A copy of the project's packages whose sources a test may edit."""
    root = tmp_path_factory.mktemp("src")
    for package in PROJECT_PACKAGES:
        shutil.copytree(ROOT / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    return root


BRANCHES = {"train/rpn", "proposals/rpn", "eval_proposals/rpn", "train/ga_rpn", "proposals/ga_rpn",
            "eval_proposals/ga_rpn", "visualize"}
EVALS = {"eval_proposals/rpn", "eval_proposals/ga_rpn"}


@pytest.mark.parametrize("module, expected", [
    ("stages/common/synthetic.py", set(ALL)),  # the data stage generates with it: everything downstream
    ("stages/common/coco.py", set(ALL)),  # the one COCO reader: data validates, evaluation reads
    ("stages/common/datasets.py", BRANCHES),  # training flip / image reading: not the data node
    ("ga_models/layers.py", BRANCHES),
    ("ga_models/targets.py", BRANCHES),
    ("stages/common/proposal_cache.py", BRANCHES - {"train/rpn", "train/ga_rpn"}),
    ("stages/common/metrics.py", EVALS | {"visualize"}),  # visualize bins its anchor fit by the evaluation's aspect ranges
    ("stages/eval_proposals.py", EVALS),
    ("stages/visualize.py", {"visualize"}),
    ("stages/proposals.py", {"proposals/rpn", "proposals/ga_rpn"} | EVALS | {"visualize"}),  # a stage: its nodes and downstream
    ("stages/common/figures.py", {"visualize"}),
    ("ga_models/introspect.py", {"visualize"}),
    ("stages/common/plots.py", {"eval_proposals/rpn", "eval_proposals/ga_rpn", "visualize"}),
    ("pipeline/report/build.py", set()),  # the report is drawn from the nodes, it is not one
    ("pipeline/runner.py", set()),  # orchestration does not change any output
    ("pipeline/tracking.py", set()),
])
def test_editing_a_module_rekeys_exactly_the_nodes_that_import_it_and_downstream(source_copy, module, expected):
    cfg, dag = CFG, build_dag(CFG)
    base = cache_keys(cfg, dag, source_copy)
    path = source_copy / module
    original = path.read_bytes()
    try:
        path.write_bytes(original + b"\n# edited\n")
        new = cache_keys(cfg, dag, source_copy)
    finally:
        path.write_bytes(original)
    assert {n for n in base if base[n] != new[n]} == expected
    assert cache_keys(cfg, dag, source_copy) == base


def test_every_project_module_a_stage_loads_is_in_its_code_hash():
    """The static import closure covers what importing the stage module really loads: one fresh
    interpreter imports each stage module after dropping every project module the previous one
    loaded (third-party packages stay imported, so torch is imported once)."""
    names = [stage.module.__name__ for stage in STAGES]
    probe = (f"import importlib, json, sys\nloaded = {{}}\nfor name in {names!r}:\n"
             f"    for m in [m for m in sys.modules if m.split('.')[0] in {PROJECT_PACKAGES!r}]:\n"
             f"        del sys.modules[m]\n"
             f"    importlib.import_module(name)\n"
             f"    loaded[name] = [m for m in sys.modules if m.split('.')[0] in {PROJECT_PACKAGES!r}]\n"
             f"print(json.dumps(loaded))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    loaded = json.loads(result.stdout.splitlines()[-1])
    assert set(loaded) == set(names)
    for name, modules in loaded.items():
        static, _ = import_closure(name)
        assert name in modules and set(modules) <= set(static), f"{name}: {set(modules) - set(static)}"
        assert not any(m.startswith("pipeline") for m in static), f"{name} imports the pipeline"


def commit(store, stage, key, files=None, metrics=None):
    out = store.prepare(stage, key)
    for name, text in (files or {"out.txt": "x"}).items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    store.upload(stage, key, out)
    return store.commit(stage, key, {"metrics": metrics or {}, "outputs": {}})


def test_manifest_lists_files_with_checksums_and_is_written_last(tmp_path):
    store = ArtifactStore(tmp_path)
    manifest = commit(store, "train", "k1", {"model.pt": "weights", "sub/h.json": "{}"}, {"loss": 1.5})
    assert [f["path"] for f in manifest["files"]] == ["model.pt", "sub/h.json"]
    assert manifest["files"][0]["bytes"] == 7 and len(manifest["files"][0]["sha256"]) == 64
    on_disk = json.loads((tmp_path / "train" / "k1" / MANIFEST).read_text())
    assert on_disk["metrics"] == {"loss": 1.5} and on_disk["key"] == "k1"
    assert store.check("train", "k1")[0] is not None
    assert not [p for p in (tmp_path / "train" / "k1").iterdir() if p.name.startswith(".")]  # no temp left


def test_node_without_manifest_or_with_damaged_files_is_not_used(tmp_path):
    store = ArtifactStore(tmp_path)
    assert store.check("data", "k") == (None, "no output yet")
    out = store.prepare("data", "k")
    (out / "half.json").write_text("{")  # the producer died before committing
    assert store.check("data", "k") == (None, "partial output (no manifest)")
    assert not (store.prepare("data", "k") / "half.json").exists()  # a re-run starts clean

    commit(store, "data", "k", {"a.txt": "abc"})
    (tmp_path / "data" / "k" / "a.txt").write_text("abcd")
    assert "a.txt is 4 bytes" in store.check("data", "k")[1]
    (tmp_path / "data" / "k" / "a.txt").write_text("abd")  # same size, different bytes
    assert store.check("data", "k")[1] == "damaged output: a.txt differs from the manifest's sha256"
    (tmp_path / "data" / "k" / "a.txt").write_text("abc")  # restored (a copy): a new mtime, the same bytes
    assert store.check("data", "k")[0] is not None
    (tmp_path / "data" / "k" / "a.txt").unlink()
    assert "a.txt is missing" in store.check("data", "k")[1]
    (tmp_path / "data" / "k" / MANIFEST).write_text('{"files": [')  # torn manifest = none
    assert store.check("data", "k")[0] is None


def test_plan_reuses_complete_nodes_and_runs_only_what_is_needed(tmp_path):
    dag, store = build(), ArtifactStore(tmp_path)
    keys = keys_for()
    plan = make_plan(dag, keys, store, list(dag))
    assert [s.node.id for s in plan] == ALL and all(s.run and s.reason == "no output yet" for s in plan)

    for node_id in ("data", "train/rpn", "proposals/rpn"):
        commit(store, dag[node_id].stage.name, keys[node_id])
    plan = {s.node.id: s for s in make_plan(dag, keys, store, list(dag))}
    assert sorted(n for n, s in plan.items() if not s.run) == ["data", "proposals/rpn", "train/rpn"]
    assert plan["proposals/rpn"].reason == CACHED and plan["proposals/rpn"].manifest["key"] == keys["proposals/rpn"]

    # one stage: a cached target needs none of its inputs
    assert [s.node.id for s in make_plan(dag, keys, store, ["proposals/rpn"])] == ["proposals/rpn"]
    # a target that runs pulls in its inputs, cached or not
    steps = make_plan(dag, keys, store, ["eval_proposals/ga_rpn"])
    assert [(s.node.id, s.run) for s in steps] == [
        ("data", False), ("train/ga_rpn", True), ("proposals/ga_rpn", True), ("eval_proposals/ga_rpn", True)]


def test_force_and_from(tmp_path):
    dag, store = build(), ArtifactStore(tmp_path)
    keys = keys_for()
    for node_id in dag:
        commit(store, dag[node_id].stage.name, keys[node_id])
    assert not any(s.run for s in make_plan(dag, keys, store, list(dag)))
    forced = {s.node.id: s.reason for s in make_plan(dag, keys, store, list(dag), force={"train/rpn"}) if s.run}
    assert forced == {"train/rpn": FORCED}
    rerun = {s.node.id: s.reason for s in make_plan(dag, keys, store, list(dag), rerun_from={"proposals/ga_rpn"}) if s.run}
    assert rerun == {"proposals/ga_rpn": RERUN, "eval_proposals/ga_rpn": RERUN, "visualize": RERUN}


def test_remote_store_uploads_and_local_dir_verifies_what_it_fetches(tmp_path):
    store = ArtifactStore("mock:///store", local_cache=tmp_path / "cache")  # pyarrow's in-memory filesystem
    assert not store.is_local
    commit(store, "train", "k", {"model.pt": "weights", "sub/h.json": "{}"})
    assert store.check("train", "k")[0] is not None
    fetched = store.local_dir("train", "k")
    assert (fetched / "model.pt").read_text() == "weights" and (fetched / "sub/h.json").read_text() == "{}"

    commit(store, "train", "bad", {"model.pt": "weights"})
    with store.fs.open_output_stream(store.path("train", "bad", "model.pt")) as f:
        f.write(b"WEIGHTS")  # same size, other bytes
    with pytest.raises(StoreError, match=r"mock:///store/train/bad/model.pt: downloaded 7 bytes"):
        store.local_dir("train", "bad")
    assert [p.name.split("-")[0] for p in (tmp_path / "cache" / "train").iterdir()] == ["k"]  # nothing half-fetched kept

    commit(store, "train", "k", {"model.pt": "rebuilt", "sub/h.json": "{}"})  # --force: same key, new files
    assert (store.local_dir("train", "k") / "model.pt").read_text() == "rebuilt"
    assert (fetched / "model.pt").read_text() == "weights"  # a reader of the old copy is not pulled from under
    staged = store.prepare("train", "s")
    (staged / "a.txt").write_text("x")
    store.upload("train", "s", staged)
    assert not staged.exists()  # staging does not pile up in the local cache


def test_plan_rebuilds_a_damaged_node_whether_or_not_anything_reads_it(tmp_path):
    dag, store = build(), ArtifactStore(tmp_path)
    keys = keys_for()
    for node_id in ("data", "train/rpn"):
        commit(store, dag[node_id].stage.name, keys[node_id], {"model.pt": "weights"})
    (tmp_path / "train" / keys["train/rpn"] / "model.pt").write_text("WEIGHTS")  # same size, other bytes
    # train/rpn as a target that nothing reads: rebuilt, not served as valid
    step = {s.node.id: s for s in make_plan(dag, keys, store, ["train/rpn"])}["train/rpn"]
    assert step.run and step.reason == "damaged output: model.pt differs from the manifest's sha256"
    # proposals/rpn reads train/rpn: rebuilt first
    steps = {s.node.id: s for s in make_plan(dag, keys, store, ["proposals/rpn"])}
    assert steps["train/rpn"].run and "model.pt differs" in steps["train/rpn"].reason
    assert not steps["data"].run


def test_coco_keys_follow_content_and_training_follows_the_train_split_only(tmp_path):
    """Replaced images re-key what reads them; a touched annotation file re-keys nothing; a new
    val set re-keys the data node and the evaluations but retrains nothing."""
    import os

    from stages.common import synthetic

    overrides = ["data.synthetic=null"]
    for i, split in enumerate(("train", "val")):
        ann, images = synthetic.generate(tmp_path / split, 3, 64, seed=i)
        overrides += [f"data.{split}_ann={ann}", f"data.{split}_images={images}"]

    def keys():
        cfg = resolve("smoke", overrides)
        return cache_keys(cfg, build_dag(cfg))

    trains = ("train/rpn", "train/ga_rpn", "train_detector/faster_rcnn")
    before = keys()
    val_ann = tmp_path / "val" / "annotations.json"
    os.utime(val_ann, ns=(1, 1))  # touched: same content
    assert keys() == before

    image = next((tmp_path / "val" / "images").iterdir())
    image.write_bytes(image.read_bytes())  # replaced (new mtime)
    after_val_images = keys()
    assert after_val_images["data"] != before["data"] and after_val_images["eval_proposals/rpn"] != before["eval_proposals/rpn"]
    assert all(after_val_images[n] == before[n] for n in trains)

    content = json.loads(val_ann.read_text())
    content["annotations"] = content["annotations"][:-1]
    val_ann.write_text(json.dumps(content))
    after_val_ann = keys()
    assert after_val_ann["data"] != after_val_images["data"] and all(after_val_ann[n] == before[n] for n in trains)

    image = next((tmp_path / "train" / "images").iterdir())
    image.write_bytes(image.read_bytes())
    assert all(keys()[n] != before[n] for n in trains)


def test_stage_modules_are_named_as_their_stages_and_import_no_other_stage():
    """``stages/<name>.py`` is stage ``<name>`` and its helpers live in ``stages/common``: a stage's
    import closure holds no other stage module, so an edit to one stage re-keys only its own nodes
    and their descendants (``stages.contract`` is the seam every stage shares, not a stage)."""
    stage_modules = {stage.module.__name__ for stage in STAGES}
    assert stage_modules == {f"stages.{stage.name}" for stage in STAGES}
    on_disk = {f"stages.{p.stem}" for p in (ROOT / "stages").glob("*.py") if p.stem not in ("__init__", "contract")}
    assert on_disk == stage_modules, f"modules in stages/ that are no stage: {sorted(on_disk - stage_modules)}"
    for name in stage_modules:
        static, _ = import_closure(name)
        assert not (set(static) & stage_modules) - {name}, f"{name} imports the stage(s) {sorted((set(static) & stage_modules) - {name})}"
