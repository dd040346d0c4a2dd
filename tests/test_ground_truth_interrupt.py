"""Interrupted retraining, in real subprocesses: nothing half-trained is cached.

Each case starts ``tests/scripts/retrain_run.py`` in its own session, waits until one
fit stalls inside its training loop (where scikit-learn's MLP and skorch catch
``KeyboardInterrupt``; see ``tests/scripts/retrain_models.py``), signals it, and then
checks that

- the run stopped with the expected status, and no process of its session survives;
- a rerun (in this process, same ``memory``) refits exactly the retrains that are not
  in the cache, and gives the values of an uninterrupted run, bit for bit.
"""

import functools
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from tests.scripts import retrain_models

psutil = pytest.importorskip("psutil")

pytestmark = pytest.mark.skipif(
    not hasattr(os, "killpg"), reason="needs POSIX signals and sessions"
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "scripts"
N = retrain_models.N_SUBSETS
STALL_AT = 3  # the third fit stalls: two (or, with two workers, more) are finished
# generous: a loaded 2-core machine takes many seconds to import torch in each process
STARTUP_TIMEOUT = 300
EXIT_TIMEOUT = 120


@functools.cache
def _reference(name):
    """Values of an uninterrupted run without cache."""
    return retrain_models.run(name, n_jobs=1, memory=None).values


def _env(**extra):
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
        **extra,
    }


def _session(sid):
    """Live (not zombie) processes of session ``sid``."""
    alive = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except (psutil.Error, OSError):
            continue
    return alive


def _wait_until_gone(sid, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _session(sid):
            return []
        time.sleep(0.05)
    return _session(sid)


def _kill_session(sid):
    for proc in _session(sid):
        try:
            proc.kill()
        except psutil.Error:
            pass


def _lines(path):
    return len(path.read_text().split()) if path.exists() else 0


def _default_sigint():
    # A shell without job control starts background commands with SIGINT ignored, and a
    # Python started with SIGINT ignored never raises KeyboardInterrupt: give the run the
    # Ctrl-C a terminal would, whatever shell started the test session.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_and_stall(tmp_path, name, n_jobs, argv=None):
    """Start a run; return ``(process, pid of the stalled fit)`` once a fit stalls."""
    marker = tmp_path / "stalled"
    env = _env(SKDATTRI_TEST_FIT_LOG=str(tmp_path / "fits.log"),
               SKDATTRI_TEST_STALL_AT=str(STALL_AT), SKDATTRI_TEST_STALL_FILE=str(marker))
    argv = argv or ["-m", "tests.scripts.retrain_run", name, str(n_jobs),
                    str(tmp_path / "memory"), str(tmp_path / "out.npz")]
    proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env,
                            start_new_session=True, preexec_fn=_default_sigint,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            _kill_session(proc.pid)
            out, err = proc.communicate()
            pytest.fail(f"the run never stalled (status {proc.returncode}):\n{err[-3000:]}")
        time.sleep(0.02)
    return proc, int(marker.read_text())


CASES = [
    # (model, n_jobs, what is signalled, signal, expected exit status)
    ("lr", 1, "session", signal.SIGINT, -signal.SIGINT),  # Ctrl-C
    ("mlp", 1, "session", signal.SIGINT, -signal.SIGINT),  # the MLP swallows it
    ("skorch", 1, "session", signal.SIGINT, -signal.SIGINT),  # skorch swallows it
    ("lr", 2, "parent", signal.SIGINT, -signal.SIGINT),  # kill -INT: workers are stopped
    ("mlp", 2, "stalled", signal.SIGINT, -signal.SIGINT),  # only the worker: it swallows
    ("skorch", 2, "session", signal.SIGINT, -signal.SIGINT),  # Ctrl-C, swallowed in a worker
    ("lr", 1, "parent", signal.SIGKILL, -signal.SIGKILL),
    ("skorch", 2, "parent", signal.SIGKILL, -signal.SIGKILL),  # orphaned workers must exit
    ("mlp", 2, "stalled", signal.SIGKILL, 1),  # a worker dies: the run fails
]


@pytest.mark.parametrize(("name", "n_jobs", "target", "sig", "status"), CASES,
                         ids=[f"{c[0]}-jobs{c[1]}-{c[3].name}-{c[2]}" for c in CASES])
def test_interrupted_run_caches_nothing_half_trained_and_resumes(
        tmp_path, monkeypatch, name, n_jobs, target, sig, status):
    proc, stalled = _start_and_stall(tmp_path, name, n_jobs)
    try:
        t0 = time.monotonic()
        if target == "session":
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid if target == "parent" else stalled, sig)
        _, err = proc.communicate(timeout=EXIT_TIMEOUT)
        seconds_to_exit = time.monotonic() - t0
        survivors = _wait_until_gone(proc.pid, timeout=60)
        print(f"{name} n_jobs={n_jobs} {sig.name} to {target}: exit after "
              f"{seconds_to_exit:.2f}s, session empty after {time.monotonic() - t0:.2f}s")
    finally:
        _kill_session(proc.pid)
    assert proc.returncode == status, err[-3000:]
    assert not survivors, [p.cmdline() for p in survivors]
    if status == 1:
        assert "TerminatedWorkerError" in err
    if name == "mlp" and sig == signal.SIGINT and target != "parent":
        assert "Training interrupted by user" in err  # the MLP did swallow the interrupt
    if n_jobs == 1 and sig == signal.SIGINT and name != "lr":
        assert "its result was discarded" in err  # ... and it was detected

    cache = tmp_path / "memory" / "skdattri-retrains"
    n_cached = len(list(cache.glob("*.npz")))
    assert 1 <= n_cached < N
    assert not list(cache.glob(".tmp-*"))  # no write was left half done
    monkeypatch.setenv("SKDATTRI_TEST_FIT_LOG", str(tmp_path / "rerun.log"))
    monkeypatch.delenv("SKDATTRI_TEST_STALL_AT", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. a damaged cache entry
        resumed = retrain_models.run(name, n_jobs=1, memory=str(tmp_path / "memory"))
    assert _lines(tmp_path / "rerun.log") == N - n_cached
    np.testing.assert_array_equal(resumed.values, _reference(name))
    assert sum(map(sum, resumed.provenance["from_cache"])) == n_cached


def test_module_class_in_main_with_memory_and_two_jobs(tmp_path):
    """A skorch module class defined in a script's ``__main__``, unseeded, n_jobs=2."""
    script = SCRIPTS / "main_module_run.py"
    log = tmp_path / "fits.log"

    def run(out):
        proc = subprocess.run(
            [sys.executable, str(script), str(tmp_path / "memory"), str(out), str(log)],
            cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=STARTUP_TIMEOUT,
            start_new_session=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return np.load(out)

    first = run(tmp_path / "first.npz")
    n_fits = _lines(log)
    assert n_fits == int(first["n_retrains"]) == 4
    second = run(tmp_path / "second.npz")
    assert _lines(log) == n_fits  # the second run refits nothing
    np.testing.assert_array_equal(second["values"], first["values"])
    assert second["from_cache"].all() and not first["from_cache"].any()
