"""``python -m skdattri``: the demo (default) and the benchmark command."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

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


# ------------------------------------------------------------------ argument checking
BAD_ARGUMENTS = [
    (["nosuch"], "Unknown setting 'nosuch'"),
    (["digits-lr", "--methods", "grad-dot", "nope"], "Unknown method 'nope'"),
    (["digits-lr", "--methods", "trak-5"], "does not apply to setting 'digits-lr'"),
    (["digits-lr", "--n-subsets", "0"], "n_subsets must be an integer >= 2, got 0"),
    (["digits-lr", "--n-subsets", "1"], "n_subsets must be an integer >= 2, got 1"),
    (["digits-lr", "--n-loo", "1"], "n_loo must be"),
    (["digits-lr", "--n-loo", "many"], "argument --n-loo: expected 'auto' or an integer"),
    (["digits-lr", "--subset-fraction", "1.5"], "subset_fraction must lie in (0, 1)"),
    (["digits-lr", "--n-jobs", "0"], "n_jobs must be a non-zero integer"),
    (["digits-lr", "--threads", "-2"], "n_threads must be an integer >= 0"),
    (["digits-lr", "--n-train", "0"], "n_train must be an integer >= 1"),
    (["digits-lr", "--device", "tpu"], "device='tpu' is not a device torch knows"),
    (["digits-lr", "--output", "{missing}/results.json"], "does not exist"),
    (["digits-lr", "--output", "{tmp}"], "is a folder, not a file"),
    (["digits-lr", "--plot", "{missing}/figure.png"], "does not exist"),
    (["digits-lr", "--plot", "{tmp}/figure.xyz"], "unknown figure format 'xyz'"),
    (["digits-lr", "--cache-dir", "{tmp}/a-file/cache"], "is not a folder"),
    (["digits-lr", "--unknown-option"], "unrecognized arguments: --unknown-option"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_ARGUMENTS,
                         ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_bad_benchmark_arguments_stop_before_any_training(argv, message, tmp_path, capsys,
                                                          monkeypatch):
    if "--plot" in argv:
        pytest.importorskip("matplotlib")
    from skdattri.benchmark import _runner

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    for name in ("train_with_checkpoints", "compute_ground_truth", "_run_methods"):
        monkeypatch.setattr(_runner, name, no_training)
    (tmp_path / "a-file").write_text("")
    argv = [a.format(tmp=tmp_path, missing=tmp_path / "missing") for a in argv]
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as exc:
        main(["benchmark", *argv, "--cache-dir", str(tmp_path / "cache"), "--quiet"]
             if "--cache-dir" not in argv else ["benchmark", *argv, "--quiet"])
    seconds = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("python -m skdattri") and ": error: " in err
    assert message in err
    print(f"{' '.join(argv)}: exit 2 after {seconds:.3f}s")  # measured, not asserted


def test_threads_limit_the_training_too(tmp_path, monkeypatch):
    from threadpoolctl import threadpool_info, threadpool_limits

    from skdattri.benchmark import _runner

    seen = []

    class Stop(Exception):
        pass

    def training(*args, **kwargs):
        blas = [pool["num_threads"] for pool in threadpool_info()]
        seen.append((torch.get_num_threads(), max(blas, default=1)))
        raise Stop

    monkeypatch.setattr(_runner, "train_with_checkpoints", training)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with threadpool_limits(limits=2):
            for threads in ("1", "0"):
                with pytest.raises(Stop):
                    main(["benchmark", "digits-lr", "--threads", threads, "--n-jobs", "1",
                          "--cache-dir", str(tmp_path), "--quiet"])
    finally:
        torch.set_num_threads(old)
    assert seen[0] == (1, 1)  # --threads 1: one torch and one BLAS thread while training
    assert seen[1][0] == 2  # --threads 0: left as they were


def test_progress_is_shown_by_default(tmp_path, capsys):
    argv = ["benchmark", "digits-lr", "--methods", "grad-dot", "--n-train", "40", "--n-test",
            "6", "--n-subsets", "3", "--n-loo", "0", "--no-auc", "--n-jobs", "1",
            "--cache-dir", str(tmp_path)]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "training digits-lr" in err and "checkpoints" in err
    assert "LDS ground truth (3 subsets)" in err  # the retraining progress bar
    assert main([*argv, "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_table_shows_dattris_published_lds_beside_the_measured_one():
    from skdattri.benchmark import DATTRI_PUBLISHED_LDS, format_table

    def record(setting, method, lds):
        return {"method": method, "lds": lds, "loo": None, "auc": None, "fit_seconds": 1.0,
                "transform_seconds": 0.5, "peak_memory_mb": 10.0, "setting": setting}

    table = format_table([record("mnist10-lr", "if-explicit", 0.812),
                          record("mnist10-lr", "grad-dot", 0.1)]).splitlines()
    assert table[0].split()[:4] == ["method", "LDS", "dattri", "(published)"]
    assert table[2].split()[:3] == ["if-explicit", "0.812",
                                    f"{DATTRI_PUBLISHED_LDS['mnist10-lr']['if-explicit']:.2f}"]
    assert table[3].split()[:3] == ["grad-dot", "0.100", "-"]
    # no column where dattri published nothing for the setting
    plain = format_table([record("digits-lr", "if-explicit", 0.9)]).splitlines()[0]
    assert "dattri" not in plain and plain.split()[:3] == ["method", "LDS", "LOO"]


def test_benchmark_n_subsets_defaults_to_the_settings(monkeypatch):
    from skdattri import cli

    seen = {}

    def fake_prepare(setting, **kwargs):
        seen[setting] = kwargs["n_subsets"]
        raise ValueError("stop")

    monkeypatch.setattr("skdattri.benchmark._runner._prepare", fake_prepare)
    for name in ["digits-lr", "mnist10-lr"]:
        with pytest.raises(SystemExit):
            cli.main(["benchmark", name])
    assert seen == {"digits-lr": 50, "mnist10-lr": 100}
