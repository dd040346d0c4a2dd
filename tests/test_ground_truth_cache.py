"""The retrain cache, saved files and provenance: damage is detected, never used."""

import json
import os
import signal
import time
import warnings

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from skorch import NeuralNetClassifier

from skdattri.ground_truth import (
    LDSGroundTruth,
    LOOGroundTruth,
    lds_ground_truth,
    load_ground_truth,
    loo_ground_truth,
)
from skdattri.ground_truth._cache import RetrainCache
from skdattri.ground_truth._fingerprint import fingerprint
from skdattri.ground_truth._interrupt import interruption_guard
from skdattri.ground_truth._retrain import Measure, fit_clone_and_apply
from skdattri.ground_truth._store import write_npz
from skdattri.ground_truth._targets import query_targets

N_SUBSETS = 4
_FITS = {"n": 0, "interrupt_at": None}


class CountingLR(LogisticRegression):
    """Counts fits; fit number ``interrupt_at`` is Ctrl-C'd and swallows it (like an MLP)."""

    def fit(self, X, y, sample_weight=None):
        _FITS["n"] += 1
        if _FITS["n"] == _FITS["interrupt_at"]:
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)  # the handler raises at once
            except KeyboardInterrupt:
                pass  # swallowed: a half-trained model is returned below
        return super().fit(X, y, sample_weight=sample_weight)


@pytest.fixture
def problem():
    rng = np.random.RandomState(0)
    X = rng.normal(size=(40, 3))
    y = (X[:, 0] + 0.3 * rng.normal(size=40) > 0).astype(int)
    return X[:30], y[:30], X[30:], y[30:]


@pytest.fixture
def default_sigint():
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def _lds(problem, memory, **kw):
    return lds_ground_truth(CountingLR(), *problem, n_subsets=N_SUBSETS, random_state=0,
                            memory=memory, **kw)


def _entries(memory):
    return sorted((memory / "skdattri-retrains").glob("*.npz"))


def test_a_swallowed_interrupt_is_reraised_and_nothing_of_it_cached(
        tmp_path, problem, default_sigint):
    _FITS.update(n=0, interrupt_at=3)
    with pytest.raises(KeyboardInterrupt, match="its result was discarded"):
        _lds(problem, tmp_path)
    assert len(_entries(tmp_path)) == 2  # the two finished fits, not the interrupted one
    _FITS.update(n=0, interrupt_at=None)
    resumed = _lds(problem, tmp_path)
    assert _FITS["n"] == N_SUBSETS - 2
    _FITS.update(n=0)
    np.testing.assert_array_equal(resumed.values, _lds(problem, None).values)
    # a handler that ignores SIGINT leaves the fit alone
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with interruption_guard() as state:
        os.kill(os.getpid(), signal.SIGINT)
    assert not state.interrupted


def test_damaged_cache_entries_are_reported_in_one_line_and_recomputed(tmp_path, problem):
    _FITS.update(n=0, interrupt_at=None)
    first = _lds(problem, tmp_path)
    entries = _entries(tmp_path)
    assert len(entries) == N_SUBSETS and _FITS["n"] == N_SUBSETS
    good = entries[0].read_bytes()
    entries[0].write_bytes(good[: len(good) // 2])  # truncated
    entries[1].write_bytes(b"\x00garbage" * 20)  # overwritten
    entries[2].write_bytes(good)  # another entry's file
    key = entries[3].stem
    write_npz(entries[3], {"value": np.full(first.n_test, np.nan), "key": np.array(key),
                           "record": np.array("{}")})  # not finite
    (entries[0].parent / ".tmp-left-by-a-killed-write.npz").write_bytes(b"half")
    _FITS.update(n=0)
    with pytest.warns(UserWarning) as caught:
        again = _lds(problem, tmp_path)
    messages = [str(w.message) for w in caught if "Cached retrain" in str(w.message)]
    assert len(messages) == 4
    assert all(len(m.splitlines()) == 1 and m.endswith("recomputing it.") for m in messages)
    assert sum("damaged or truncated" in m for m in messages) == 2
    assert any("do not belong to this key" in m for m in messages)
    assert any("NaN" in m for m in messages)
    assert _FITS["n"] == 4
    np.testing.assert_array_equal(again.values, first.values)
    _FITS.update(n=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _lds(problem, tmp_path)  # repaired: no warning, no fit
    assert _FITS["n"] == 0


def test_verify_refits_cached_entries_and_catches_a_wrong_one(tmp_path, problem):
    _FITS.update(n=0, interrupt_at=None)
    first = _lds(problem, tmp_path)
    _FITS.update(n=0)
    checked = _lds(problem, tmp_path, verify=2)
    assert _FITS["n"] == 2  # two cached entries refitted, nothing else
    np.testing.assert_array_equal(checked.values, first.values)
    assert all(all(row) for row in checked.provenance["from_cache"])

    # an entry with a plausible but wrong value (as a swallowed interrupt once cached)
    cache = RetrainCache(tmp_path)
    key = first.provenance["keys"][1][0]
    assert cache.record(key)["seed"] == first.provenance["seeds"][0]
    cache.store(key, first.values[1] + 0.3, cache.record(key))
    _FITS.update(n=0)
    with pytest.raises(ValueError, match=r"verify: 1 of 4 .*largest difference 0\.3"):
        _lds(problem, tmp_path, verify=1.0)
    assert not cache.path(key).exists()  # removed, so a rerun recomputes it
    _FITS.update(n=0)
    np.testing.assert_array_equal(_lds(problem, tmp_path).values, first.values)
    assert _FITS["n"] == 1
    with pytest.raises(ValueError, match="pass memory="):
        _lds(problem, None, verify=1)


def test_provenance_is_saved_and_loaded(tmp_path, problem):
    _FITS.update(n=0, interrupt_at=None)
    gt = _lds(problem, tmp_path)
    prov = gt.provenance
    assert prov["target"] == "loss" and "CountingLR" in prov["estimator"]
    assert prov["estimator_fingerprint"] == fingerprint(CountingLR())
    assert len(prov["keys"]) == N_SUBSETS and len(prov["seeds"]) == 1
    assert len(set(prov["removed_fingerprints"])) == N_SUBSETS  # one subset per retrain
    assert not any(map(any, prov["from_cache"]))
    gt.save(tmp_path / "gt")
    back = load_ground_truth(tmp_path / "gt.npz")
    assert back.provenance == prov
    np.testing.assert_array_equal(back.values, gt.values)
    loo = loo_ground_truth(CountingLR(), *problem, indices=[0, 3], random_state=0, n_repeats=2)
    assert len(loo.provenance["keys"]) == 3 and len(loo.provenance["seeds"]) == 2  # full + 2
    with pytest.raises(TypeError, match="provenance must be a dict"):
        LOOGroundTruth([0], [[1.0]], provenance="x")


def test_damaged_ground_truth_files_raise_a_value_error_naming_them(tmp_path):
    gt = LDSGroundTruth(np.eye(3, dtype=bool), np.ones((3, 2)))
    path = tmp_path / "gt.npz"
    gt.save(path)
    good = path.read_bytes()
    for damage in (good[:-40], good[: len(good) // 3], b"", b"not a zip file at all" * 5):
        path.write_bytes(damage)
        with pytest.raises(ValueError, match=f"{path}.*damaged or truncated"):
            load_ground_truth(path)
    np.save(tmp_path / "single.npy", np.ones(3))
    with pytest.raises(ValueError, match="single.npy.*not an .npz archive"):
        load_ground_truth(tmp_path / "single.npy")
    np.savez(path, kind=np.array("lds"), masks=np.eye(2, dtype=bool),
             values=np.full((2, 1), np.inf), target=np.array("loss"))
    with pytest.raises(ValueError, match=f"{path} holds an invalid LDSGroundTruth: .*NaN"):
        load_ground_truth(path)
    with pytest.raises(FileNotFoundError):
        load_ground_truth(tmp_path / "missing.npz")


def test_an_interrupted_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "gt.npz"
    LDSGroundTruth(np.eye(2, dtype=bool), np.zeros((2, 1))).save(path)

    def interrupted(file, **entries):
        file.write(b"PK\x03\x04 a few bytes")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", interrupted)
    with pytest.raises(KeyboardInterrupt):
        LDSGroundTruth(np.eye(2, dtype=bool), np.ones((2, 1))).save(path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gt.npz"]  # no temporary left
    np.testing.assert_array_equal(load_ground_truth(path).values, np.zeros((2, 1)))


def test_fingerprints_follow_the_recipe_not_the_object():
    est = make_pipeline(StandardScaler(), LogisticRegression(C=0.5))
    assert fingerprint(est) == fingerprint(make_pipeline(StandardScaler(),
                                                         LogisticRegression(C=0.5)))
    assert fingerprint(est) != fingerprint(make_pipeline(StandardScaler(),
                                                         LogisticRegression(C=0.6)))

    def module_class(width):
        class Net(torch.nn.Module):  # same name, different code
            def __init__(self):
                super().__init__()
                self.out = torch.nn.Linear(3, width)

        return Net

    assert fingerprint(NeuralNetClassifier(module_class(2))) == fingerprint(
        NeuralNetClassifier(module_class(2)))
    assert fingerprint(NeuralNetClassifier(module_class(2))) != fingerprint(
        NeuralNetClassifier(module_class(3)))
    torch.manual_seed(0)
    a = torch.nn.Linear(3, 2)
    torch.manual_seed(0)
    b = torch.nn.Linear(3, 2)
    assert fingerprint(a) == fingerprint(b) != fingerprint(torch.nn.Linear(3, 2))
    assert fingerprint(torch.ones(2)) != fingerprint(torch.ones(2, dtype=torch.float64))
    assert fingerprint({"a": 1, "b": (2, 3)}) == fingerprint({"b": (2, 3), "a": 1})


_SLOTTED = """
from skdattri.ground_truth._fingerprint import fingerprint
class Slotted:
    __slots__ = ("a",)
    def __init__(self, a):
        self.a = a
class Opaque:
    __slots__ = ()
print(fingerprint(Slotted(3)), fingerprint(Slotted(4)), fingerprint(Opaque()))
"""


def test_fingerprints_of_slotted_and_opaque_objects_are_the_same_in_every_process():
    import subprocess
    import sys

    runs = [subprocess.run([sys.executable, "-c", _SLOTTED], capture_output=True, text=True,
                           check=True).stdout.split() for _ in range(2)]
    assert runs[0] == runs[1]  # no memory address in what is hashed
    assert runs[0][0] != runs[0][1]  # the slots are described


def test_duplicate_loo_indices_are_refused_before_any_retrain(problem):
    X, y, Xq, yq = problem
    fits = []

    class Counting(LogisticRegression):
        def fit(self, X, y, sample_weight=None):
            fits.append(1)
            return super().fit(X, y, sample_weight)

    with pytest.raises(ValueError, match="must not contain duplicates"):
        loo_ground_truth(Counting(), X, y, Xq, yq, indices=[1, 1], n_jobs=1)
    assert fits == []


def test_a_module_instance_with_memory_is_warned_about(tmp_path, problem):
    X, y, Xq, yq = (np.asarray(a, dtype=np.float32) if a.dtype.kind == "f" else a
                    for a in problem)
    net = NeuralNetClassifier(torch.nn.Linear(3, 2), criterion=torch.nn.CrossEntropyLoss,
                              max_epochs=2, train_split=None, verbose=0)
    with pytest.warns(UserWarning, match="'module' is a torch module instance"):
        gt = lds_ground_truth(net, X, y, Xq, yq, n_subsets=2, random_state=0,
                              memory=tmp_path)
    assert gt.values.shape == (2, len(yq))


def test_memory_arguments(tmp_path, problem):
    import joblib

    assert RetrainCache.from_memory(None) is None
    assert RetrainCache.from_memory(joblib.Memory(None)) is None
    cache = RetrainCache.from_memory(joblib.Memory(tmp_path / "jm", verbose=0))
    assert cache.directory == tmp_path / "jm" / "skdattri-retrains"
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="cannot hold the retrain cache"):
        _lds(problem, tmp_path / "file")
    measure = Measure(query_targets, problem[2], problem[3], "loss")
    value = fit_clone_and_apply(LogisticRegression(), problem[0], problem[1],
                                np.array([0, 1]), 0, measure)
    assert value.shape == (measure.n_values,)
    assert json.loads(json.dumps(measure.fingerprint()))  # a plain string
