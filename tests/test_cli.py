"""``python -m skdattri``: the demo (default) and the benchmark command."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from skdattri.benchmark import RECORD_KEYS, list_methods
from skdattri.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_with_few_epochs(capsys):
    assert main(["demo", "--epochs", "2", "--n-queries", "1", "--top", "1"]) == 0
    out = capsys.readouterr().out
    assert "skdattri demo" in out and "TracIn" in out and "helpful" in out


def test_no_command_is_the_demo(capsys):
    assert main(["--epochs", "1", "--n-queries", "1", "--top", "1"]) == 0
    assert "skdattri demo" in capsys.readouterr().out


def test_benchmark_list(capsys):
    assert main(["benchmark", "--list"]) == 0
    out = capsys.readouterr().out
    assert "settings:" in out and "methods:" in out
    assert "digits-lr" in out and "digits-mlp-noisy" in out
    methods = out.split("methods:\n", 1)[1].splitlines()
    assert [line.split()[0] for line in methods] == [name for name, _ in list_methods()]
    for line, (name, description) in zip(methods, list_methods()):
        assert line.split() == [name, *description.split()]  # nothing appended to it


def test_benchmark_needs_a_setting(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["benchmark"])
    assert exc.value.code == 2
    assert "needs a SETTING" in capsys.readouterr().err


def test_benchmark_writes_json_and_plot(tmp_path, capsys):
    out_json, out_png = tmp_path / "results.json", tmp_path / "figure.png"
    argv = ["benchmark", "digits-lr", "--methods", "grad-dot", "grad-cos", "--n-train", "50",
            "--n-test", "8", "--n-subsets", "3", "--n-loo", "3", "--n-jobs", "1",
            "--cache-dir", str(tmp_path / "cache"), "--output", str(out_json), "--quiet"]
    try:
        import matplotlib  # noqa: F401
        argv += ["--plot", str(out_png)]
    except ImportError:  # pragma: no cover
        out_png = None
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].split()[:4] == ["method", "LDS", "LOO", "AUC"]
    assert "grad-cos" in printed
    records = json.loads(out_json.read_text())
    assert [r["method"] for r in records] == ["grad-dot", "grad-cos"]
    for r in records:
        assert set(RECORD_KEYS) <= set(r)
        for key in RECORD_KEYS[2:]:
            assert math.isfinite(r[key])
    if out_png is not None:
        assert out_png.read_bytes()[:4] == b"\x89PNG"


def test_python_m_skdattri_benchmark_list():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "skdattri", "benchmark", "--list"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "digits-lr" in proc.stdout and "tracin" in proc.stdout
