"""Lint is part of the test command (README): the Python sources pass ruff (rules in pyproject.toml), the workflow
passes Snakemake's own linter and snakefmt's formatting check. Each runs the real tool on the real tree."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src")}


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)


def test_python_sources_pass_ruff():
    r = _run(str(BIN / "ruff"), "check", "--no-cache", "src", "tests", "benchmarks", "scripts")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_workflow_passes_snakefmt_check():
    r = _run(str(BIN / "snakefmt"), "--check", "Snakefile", "workflow/rules")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_workflow_passes_snakemakes_linter():
    r = _run(sys.executable, "-m", "snakemake", "--lint")
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert "Congratulations" in r.stdout + r.stderr
