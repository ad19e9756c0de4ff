"""benchmarks/_common.py: what every result file records about how it was measured."""
import json
import platform
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import torch

import knnad

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import _common  # noqa: E402


def test_results_record_the_commit_the_versions_and_the_machine(tmp_path, monkeypatch):
    """Issue #21: a result names the code (git commit) and the knnad, torch, faiss and Python
    versions beside the CPU and GPU, in the .json and the .md."""
    monkeypatch.setattr(_common, "RESULTS", tmp_path)
    written = _common.write_results("probe", {"a table": [{"value": 1.0}]}, tag="here")
    machine = json.loads(written.with_suffix(".json").read_text())["machine"]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=BENCHMARKS, capture_output=True,
                            text=True, check=True).stdout.strip()
    assert machine["git_commit"] == commit and isinstance(machine["git_dirty"], bool)
    versions = (knnad.__version__, torch.__version__, faiss.__version__, np.__version__,
                platform.python_version())
    assert tuple(machine[name] for name in ("knnad", "torch", "faiss", "numpy", "python")) \
        == versions
    assert machine["cpu"] and machine["cores"] and "gpu" in machine
    assert f"Machine: {json.dumps(machine)}" in written.read_text()


def test_results_record_the_code_as_it_was_when_the_run_started(tmp_path, monkeypatch):
    """A script that writes a tracked file (bench_scaling's plot) before its tables must not
    record its own output as an uncommitted change: the state is read when the script starts."""
    monkeypatch.setattr(_common, "RESULTS", tmp_path)
    monkeypatch.setattr(_common, "git_state",
                        lambda: {"git_commit": "changed since", "git_dirty": True})
    written = _common.write_results("probe", {"a table": [{"value": 1.0}]}, tag="here")
    machine = json.loads(written.with_suffix(".json").read_text())["machine"]
    assert (machine["git_commit"], machine["git_dirty"]) == (
        _common.CODE_AT_START["git_commit"], _common.CODE_AT_START["git_dirty"])
    assert machine["git_commit"] != "changed since"


def test_new_result_files_do_not_mark_the_code_as_changed(tmp_path):
    """One benchmark's results, written into the checkout, must not make the next benchmark of
    the same run record its (unchanged) code as dirty; a changed source file must."""
    def git(*arguments):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *arguments],
                       cwd=tmp_path, check=True, capture_output=True)
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "knnad").mkdir()
    result, source = tmp_path / "benchmarks" / "results" / "r.md", tmp_path / "knnad" / "m.py"
    result.write_text("old figures\n")
    source.write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "start")
    state = _common.git_state(tmp_path / "benchmarks")
    assert state["git_dirty"] is False and len(state["git_commit"]) == 40
    result.write_text("new figures\n")
    assert _common.git_state(tmp_path / "benchmarks")["git_dirty"] is False
    source.write_text("x = 2\n")
    assert _common.git_state(tmp_path / "benchmarks")["git_dirty"] is True
