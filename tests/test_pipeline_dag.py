"""Cache keys re-key exactly the downstream nodes; the plan reuses complete nodes only;
the artifact store's manifest is the commit point."""

import json

import pytest

from pipeline.config import resolve
from pipeline.dag import CACHED, FORCED, RERUN, build_dag, cache_keys, descendants, make_plan
from pipeline.store import MANIFEST, ArtifactStore

ALL = ["data", "train/rpn", "proposals/rpn", "eval_proposals/rpn",
       "train/ga_rpn", "proposals/ga_rpn", "eval_proposals/ga_rpn", "report"]


def keys_for(*overrides):
    return cache_keys(resolve("smoke", list(overrides)), build_dag())


def changed(*overrides):
    base, new = keys_for(), keys_for(*overrides)
    return {n for n in base if base[n] != new[n]}


def test_dag_shape():
    dag = build_dag()
    assert list(dag) == ALL
    assert dag["proposals/rpn"].deps == ("train/rpn", "data")
    assert dag["report"].deps == ("eval_proposals/rpn", "eval_proposals/ga_rpn")
    assert descendants(dag, {"train/rpn"}) == {"train/rpn", "proposals/rpn", "eval_proposals/rpn", "report"}
    assert list(build_dag(("ga_rpn",))) == ["data", "train/ga_rpn", "proposals/ga_rpn", "eval_proposals/ga_rpn", "report"]


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
    # an inference-only setting keeps the trained models
    ("proposer.loc_threshold=0.05", {"proposals/rpn", "eval_proposals/rpn", "proposals/ga_rpn",
                                     "eval_proposals/ga_rpn", "report"}),
    ("proposals.batch_size=1", {"proposals/rpn", "eval_proposals/rpn", "proposals/ga_rpn",
                                "eval_proposals/ga_rpn", "report"}),
    # settings that cannot change any result re-key nothing
    ("train.max_failures=3", set()),
    ("train.log_every=7", set()),
])
def test_changing_one_setting_rekeys_exactly_downstream(override, expected):
    assert changed(override) == expected


def test_code_change_rekeys_the_stage_and_downstream(monkeypatch):
    import pipeline.dag as dag_module

    base = keys_for()
    real = dag_module.code_hash
    monkeypatch.setattr(dag_module, "code_hash", lambda stage: real(stage) + ("x" if stage == "eval_proposals" else ""))
    new = keys_for()
    assert {n for n in base if base[n] != new[n]} == {"eval_proposals/rpn", "eval_proposals/ga_rpn", "report"}


def commit(store, stage, key, files=None, metrics=None):
    out = store.prepare(stage, key)
    for name, text in (files or {"out.txt": "x"}).items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    return store.commit(stage, key, out, {"metrics": metrics or {}, "outputs": {}})


def test_manifest_lists_files_with_checksums_and_is_written_last(tmp_path):
    store = ArtifactStore(tmp_path)
    manifest = commit(store, "train", "k1", {"model.pt": "weights", "sub/h.json": "{}"}, {"loss": 1.5})
    assert [f["path"] for f in manifest["files"]] == ["model.pt", "sub/h.json"]
    assert manifest["files"][0]["bytes"] == 7 and len(manifest["files"][0]["sha256"]) == 64
    on_disk = json.loads((tmp_path / "train" / "k1" / MANIFEST).read_text())
    assert on_disk["metrics"] == {"loss": 1.5} and on_disk["key"] == "k1"
    assert store.check("train", "k1", verify=True)[0] is not None
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
    assert store.check("data", "k")[0] is not None
    assert "checksum" in store.check("data", "k", verify=True)[1]
    (tmp_path / "data" / "k" / "a.txt").unlink()
    assert "a.txt is missing" in store.check("data", "k")[1]
    (tmp_path / "data" / "k" / MANIFEST).write_text('{"files": [')  # torn manifest = none
    assert store.check("data", "k")[0] is None


def test_plan_reuses_complete_nodes_and_runs_only_what_is_needed(tmp_path):
    dag, store = build_dag(), ArtifactStore(tmp_path)
    keys = keys_for()
    plan = make_plan(dag, keys, store, list(dag))
    assert [s.node.id for s in plan] == ALL and all(s.run and s.reason == "no output yet" for s in plan)

    for node_id in ("data", "train/rpn", "proposals/rpn"):
        commit(store, dag[node_id].stage, keys[node_id])
    plan = {s.node.id: s for s in make_plan(dag, keys, store, list(dag))}
    assert [n for n, s in plan.items() if not s.run] == ["data", "train/rpn", "proposals/rpn"]
    assert plan["proposals/rpn"].reason == CACHED and plan["proposals/rpn"].manifest["key"] == keys["proposals/rpn"]

    # one stage: a cached target needs none of its inputs
    assert [s.node.id for s in make_plan(dag, keys, store, ["proposals/rpn"])] == ["proposals/rpn"]
    # a target that runs pulls in its inputs, cached or not
    steps = make_plan(dag, keys, store, ["eval_proposals/ga_rpn"])
    assert [(s.node.id, s.run) for s in steps] == [
        ("data", False), ("train/ga_rpn", True), ("proposals/ga_rpn", True), ("eval_proposals/ga_rpn", True)]


def test_force_and_from(tmp_path):
    dag, store = build_dag(), ArtifactStore(tmp_path)
    keys = keys_for()
    for node_id in dag:
        commit(store, dag[node_id].stage, keys[node_id])
    assert not any(s.run for s in make_plan(dag, keys, store, list(dag)))
    forced = {s.node.id: s.reason for s in make_plan(dag, keys, store, list(dag), force={"train/rpn"}) if s.run}
    assert forced == {"train/rpn": FORCED}
    rerun = {s.node.id: s.reason for s in make_plan(dag, keys, store, list(dag), rerun_from={"proposals/ga_rpn"}) if s.run}
    assert rerun == {"proposals/ga_rpn": RERUN, "eval_proposals/ga_rpn": RERUN, "report": RERUN}
