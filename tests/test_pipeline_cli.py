"""The CLI as users run it (subprocesses; the config and work-directory errors, which end before
Ray or MLflow start, through ``main`` in this process): bad input is one line on stderr naming the
problem, a non-zero exit, and nothing written (no work directory, no MLflow store); `plan` lists
the DAG."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from stages.common.variants import DETECTORS

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, env_extra=None, cwd=ROOT):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def cli_in_process(capsys, monkeypatch, *args):
    """``pipeline.__main__.main(args)`` in this process, as ``cli`` would run it (for bad input
    that ends before Ray or MLflow start; the subprocess tests below cover the real process)."""
    from pipeline.__main__ import main

    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    capsys.readouterr()
    code = main(list(args))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pipeline: error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0]


@pytest.mark.parametrize("args, needles", [
    (["--set", "train.epoch=3"], ["unknown config key 'train.epoch'"]),
    (["--set", "train.epochs=many"], ["train.epochs: expected an integer, got 'many'"]),
    (["--preset", "nosuch"], ["preset 'nosuch'"]),
    (["--set", "data.synthetic=null", "--set", "data.root=/nonexistent", "--set", "data.train_ann=a.json",
      "--set", "data.train_images=i", "--set", "data.val_ann=v.json", "--set", "data.val_images=j"],
     ["data.train_ann: /nonexistent/a.json does not exist"]),
    (["--force", "training"], ["--force 'training': no such stage"]),
])
def test_bad_input_is_a_one_line_error_and_writes_nothing(tmp_path, capsys, monkeypatch, args, needles):
    workdir = tmp_path / "work"
    proc = cli_in_process(capsys, monkeypatch, "full", "--preset", "smoke", "--workdir", str(workdir), *args)
    assert_one_line_error(proc, *needles)
    assert not workdir.exists()


@pytest.mark.parametrize("command", [["full"], ["plan"], ["sweep", "eps_l"], ["report"]])
def test_a_workdir_that_is_a_file_is_a_one_line_error(tmp_path, capsys, monkeypatch, command):
    workdir = tmp_path / "work"
    workdir.write_text("not a directory")
    proc = cli_in_process(capsys, monkeypatch, *command, "--preset", "smoke", "--workdir", str(workdir))
    assert_one_line_error(proc, str(workdir), "exists and is not a directory")
    assert workdir.read_text() == "not a directory"


def test_broken_preset_file(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: x\ntrain: {epochs: 2\n")
    proc = cli("full", "--preset", str(bad), "--workdir", str(tmp_path / "work"))
    assert_one_line_error(proc, "broken.yaml", "not valid YAML")
    assert not (tmp_path / "work").exists()


def test_unreachable_ray_address_and_mlflow_uri(tmp_path):
    port = closed_port()
    proc = cli("full", "--preset", "smoke", "--workdir", str(tmp_path / "a"),
               env_extra={"RAY_ADDRESS": f"127.0.0.1:{port}"})
    assert_one_line_error(proc, f"RAY_ADDRESS=127.0.0.1:{port}", "cannot reach")
    assert not (tmp_path / "a").exists()

    proc = cli("full", "--preset", "smoke", "--workdir", str(tmp_path / "b"),
               env_extra={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"})
    assert_one_line_error(proc, f"http://127.0.0.1:{port}", "unreachable")
    assert not (tmp_path / "b").exists()


DETECTOR_NODES = [f"train_detector/{v}" for v in DETECTORS] + ["finetune/rpn", "finetune/ga_rpn"] + [
    f"eval_detector/{v}" for v in (*DETECTORS, "finetune_rpn", "finetune_ga_rpn")]


def test_plan_lists_every_node_with_key_and_reason_and_writes_nothing(tmp_path):
    workdir = tmp_path / "work"
    proc = cli("plan", "--preset", "smoke", "--workdir", str(workdir))
    assert proc.returncode == 0, proc.stderr
    lines = [line.split() for line in proc.stdout.splitlines()[1:]]
    assert [parts[0] for parts in lines] == ["data", "train/rpn", "train/ga_rpn", "proposals/rpn", "proposals/ga_rpn",
                                             "eval_proposals/rpn", "eval_proposals/ga_rpn", *DETECTOR_NODES, "visualize"]
    assert all(len(parts[1]) == 12 and parts[2] == "RUN" and "no output yet" in " ".join(parts) for parts in lines)
    assert not workdir.exists()


def test_plan_leaves_a_finished_runs_summary_alone_and_works_read_only(tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    summary = workdir / "summary.json"
    summary.write_text(json.dumps({"train/rpn": {"cached": False, "loss": 0.5}}))
    before = summary.read_bytes()
    workdir.chmod(0o555)
    try:
        proc = cli("plan", "--preset", "smoke", "--workdir", str(workdir))
    finally:
        workdir.chmod(0o755)
    assert proc.returncode == 0, proc.stderr
    assert summary.read_bytes() == before
    assert sorted(p.name for p in workdir.iterdir()) == ["summary.json"]


def test_help_names_the_commands():
    proc = cli("--help")
    assert proc.returncode == 0
    for word in ("full", "run STAGE", "plan", "data"):
        assert word in proc.stdout


def test_a_training_the_machine_cannot_hold_fails_at_once_with_one_line(tmp_path):
    """Ray would otherwise wait forever, printing a scheduling warning every minute."""
    proc = cli("full", "--preset", "smoke", "--workdir", str(tmp_path / "work"), "--set", "train.num_workers=64")
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]  # after Ray's own start-up lines
    assert last.startswith("pipeline: error: train/rpn needs 64 worker(s)"), proc.stderr
    assert "train.num_workers=64" in last and "room for" in last
    assert not list((tmp_path / "work").glob("data/*/manifest.json"))  # nothing ran


def test_a_second_run_on_a_busy_workdir_fails_at_once_naming_the_holder(tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    code = ("import time; from pathlib import Path; from pipeline.lock import hold\n"
            f"with hold(Path({str(workdir)!r}), 'pipeline full --preset smoke'):\n    print('in', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "in"
        for command in (["full"], ["sweep", "eps_l"]):
            proc = cli(*command, "--preset", "smoke", "--workdir", str(workdir))
            assert_one_line_error(proc, f"work directory {workdir} is in use by 'pipeline full --preset smoke' "
                                        f"(pid {holder.pid} on")
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in workdir.iterdir()) == [".lock"]  # the second runs wrote nothing
