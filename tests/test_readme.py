"""The README's two commands: the main job runs, and CI runs the test command."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def _quick_start() -> str:
    text = (ROOT / "README.md").read_text()
    return text.split("## Quick start", 1)[1].split("\n## ", 1)[0]


def _readme_commands() -> list[str]:
    return re.findall(r"```sh\n(.+?)\n```", _quick_start())


def test_ci_runs_the_readme_test_command():
    main_job, test_command = _readme_commands()[:2]
    assert "pytest" in test_command
    assert test_command in (ROOT / ".ci" / "run").read_text()
    assert "examples/digits_chain.sh" in main_job


def test_the_main_job_runs_the_whole_chain(tmp_path):
    # The README's first command, after its install step, with two seeds.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}"
           f"{os.environ.get('PATH', '')}"}
    done = subprocess.run(["bash", str(ROOT / "examples" / "digits_chain.sh"),
                           str(tmp_path / "out"), "2"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    comparison = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert set(comparison["runs"]) == {"baseline", "vbsw"}
    accuracy = comparison["runs"]["vbsw"]["accuracy"]
    assert accuracy["n"] == 2 and 0.9 < accuracy["mean"] <= 1.0
    assert (tmp_path / "out" / "digits_vbsw.onnx").stat().st_size > 0
    assert "gain per model" in done.stderr
    # The merged model's evaluation follows the comparison table, as the
    # Quick start says.
    merged = done.stderr.index("== one deployable model")
    assert done.stderr.index("gain per model") < merged
    assert "accuracy" in done.stderr[merged:]


def test_the_quick_start_says_what_the_run_ends_with():
    quick = " ".join(_quick_start().split())
    assert "Its last lines compare" not in quick
    assert ("printed before the run ends with the merged model's evaluation"
            in quick)
