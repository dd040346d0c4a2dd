"""The benchmark runner on tiny settings: records, caching, checkpoints, measurement."""

import json
import math
import pickle

import numpy as np
import pytest
import torch

from skdattri.benchmark import (
    RECORD_KEYS,
    Method,
    _memory,
    _registry,
    compute_ground_truth,
    format_table,
    get_method,
    list_methods,
    plot_results,
    run_benchmark,
    train_with_checkpoints,
    write_json,
)
from skdattri.datasets import load_setting
from skdattri.ground_truth import load_ground_truth

TINY = {"n_train": 60, "n_test": 10}

# retraining on 30 of 60 digits can miss a class; ground_truth warns about it
pytestmark = pytest.mark.filterwarnings("ignore:.*not seen by a retrained model:UserWarning")


@pytest.fixture(scope="module")
def tiny_records(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    records = run_benchmark(
        "digits-lr", methods=["grad-dot", "tracin", "knn-shapley"], n_subsets=4, n_loo=4,
        cache_dir=cache, n_jobs=1, verbose=0, **TINY)
    return records, cache


def test_list_methods():
    rows = list_methods()
    names = [name for name, _ in rows]
    assert len(names) == len(set(names))
    assert {"grad-dot", "grad-cos", "tracin", "knn-shapley"} <= set(names)
    assert names == [m.name for m in _registry.METHODS]
    assert all(isinstance(description, str) and description for _, description in rows)


def test_get_method_unknown():
    assert get_method("tracin").name == "tracin"
    with pytest.raises(ValueError, match="Unknown method 'nope'"):
        get_method("nope")


def test_records_have_the_keys_and_finite_values(tiny_records):
    records, _ = tiny_records
    assert [r["method"] for r in records] == ["grad-dot", "tracin", "knn-shapley"]
    for r in records:
        assert set(RECORD_KEYS) <= set(r)
        assert r["setting"] == "digits-lr"
        for key in ("lds", "loo", "auc", "fit_seconds", "transform_seconds",
                    "peak_memory_mb"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), (r["method"], key)
        assert -1 <= r["lds"] <= 1 and -1 <= r["loo"] <= 1 and 0 <= r["auc"] <= 1
        assert r["fit_seconds"] >= 0 and r["transform_seconds"] >= 0
        assert r["peak_memory_mb"] >= 0
        json.dumps(r["params"])  # JSON-serialisable
    tracin = records[1]["params"]
    assert tracin["checkpoints"].startswith("<") and len(tracin["learning_rates"]) >= 2


def test_ground_truth_is_cached_and_reloaded(tiny_records):
    records, cache = tiny_records
    files = sorted(p.name for p in cache.glob("digits-lr-*.npz"))
    assert len(files) == 2 and any("-lds-4x" in f for f in files)
    assert any("-loo-4-" in f for f in files)
    # a rerun loads the same ground truth from disk: identical metrics
    threads = torch.get_num_threads()
    again = run_benchmark("digits-lr", methods=["grad-dot"], n_subsets=4, n_loo=4, auc=False,
                          cache_dir=cache, n_jobs=1, n_threads=2, verbose=0, **TINY)
    assert again[0]["lds"] == records[0]["lds"] and again[0]["loo"] == records[0]["loo"]
    assert again[0]["auc"] is None
    assert torch.get_num_threads() == threads  # the thread limit is undone


def test_compute_ground_truth_auto_loo(tmp_path):
    data = load_setting("digits-lr", **TINY)
    lds, loo = compute_ground_truth(data, n_subsets=3, n_loo=0, cache_dir=tmp_path, n_jobs=1)
    assert lds.masks.shape == (3, 60) and lds.values.shape == (3, 10) and loo is None
    assert len(list((tmp_path / "retrains" / "skdattri-retrains").glob("*.npz"))) == 3


def test_a_damaged_ground_truth_file_is_reported_and_recomputed(tmp_path):
    data = load_setting("digits-lr", **TINY)
    lds, loo = compute_ground_truth(data, n_subsets=3, n_loo=3, cache_dir=tmp_path, n_jobs=1)
    files = sorted(tmp_path.glob("digits-lr-*.npz"))
    assert len(files) == 2
    for path in files:
        path.write_bytes(path.read_bytes()[:100])  # truncated, e.g. by a full disk
    with pytest.warns(UserWarning) as caught:
        lds2, loo2 = compute_ground_truth(data, n_subsets=3, n_loo=3, cache_dir=tmp_path,
                                          n_jobs=1)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2
    assert all(len(m.splitlines()) == 1 and "damaged or truncated" in m
               and m.endswith("Computing it again.") for m in messages)
    np.testing.assert_array_equal(lds2.values, lds.values)  # from the cached retrains
    np.testing.assert_array_equal(loo2.values, loo.values)
    for path in files:
        assert load_ground_truth(path).provenance["target"] == "loss"  # replaced


def test_train_with_checkpoints_sklearn():
    data = load_setting("digits-lr", **TINY)
    model, ckpts = train_with_checkpoints(data, n_checkpoints=3)
    assert ckpts.states[-1] is model and len(ckpts.states) == 3
    assert ckpts.learning_rates == [1.0, 1.0, 1.0]
    iters = [int(np.max(c.n_iter_)) for c in ckpts.states]
    assert iters == sorted(iters) and iters[0] < iters[-1]
    assert not np.allclose(ckpts.states[0].coef_, model.coef_)


def test_train_with_checkpoints_skorch(capsys):
    data = load_setting("digits-mlp", **TINY)
    data.estimator.set_params(max_epochs=4)
    model, ckpts = train_with_checkpoints(data, n_checkpoints=2, verbose=1)
    assert "training digits-mlp" in capsys.readouterr().err  # an epoch progress bar
    pickle.dumps(model)  # the progress callback leaves nothing unpicklable
    assert len(ckpts.states) == 2 and ckpts.learning_rates == [0.01, 0.01]
    final = model.module_.state_dict()
    for name, value in final.items():
        np.testing.assert_array_equal(ckpts.states[-1][name].numpy(), value.numpy())
    assert not np.allclose(ckpts.states[0]["fc1.weight"].numpy(), final["fc1.weight"].numpy())
    # the snapshots are copies, not views of the live weights
    assert ckpts.states[-1]["fc1.weight"].data_ptr() != final["fc1.weight"].data_ptr()


def test_inapplicable_or_unknown_methods_are_refused():
    with pytest.raises(ValueError, match="does not apply"):
        run_benchmark("digits-lr", methods=["trak-5"], verbose=0, **TINY)
    with pytest.raises(ValueError, match="Unknown method"):
        run_benchmark("digits-lr", methods=["nope"], verbose=0, **TINY)


def test_select_methods():
    data = load_setting("digits-mlp", **TINY)
    chosen = _registry._select_methods(None, data)
    assert [m.name for m in chosen] == [m.name for m in _registry.METHODS
                                        if m.applicable(data)]
    assert {"if-explicit", "trak-5"} <= {m.name for m in chosen}
    linear = _registry._select_methods(None, load_setting("digits-lr", **TINY))
    assert "trak-5" not in [m.name for m in linear]
    named = _registry._select_methods(["tracin", "grad-dot"], data)
    assert [m.name for m in named] == ["tracin", "grad-dot"]


def test_factory_errors_propagate(monkeypatch, tmp_path):
    def broken(setting, model, checkpoints):
        raise RuntimeError("factory bug")

    monkeypatch.setattr(_registry, "METHODS", [Method("broken", broken)])
    with pytest.raises(RuntimeError, match="factory bug"):
        run_benchmark("digits-lr", n_subsets=2, n_loo=0, auc=False, cache_dir=tmp_path,
                      n_jobs=1, verbose=0, **TINY)


def test_peak_memory_sees_a_large_allocation():
    with _memory._PeakMemory() as mem:
        block = np.ones(40 * 2**20 // 8)  # 40 MiB, every page written
    assert block[-1] == 1.0
    assert mem.peak >= 30 * 2**20


RECORDS = [
    {"method": "a", "params": {"x": 1}, "lds": 0.5, "loo": None, "auc": float("nan"),
     "fit_seconds": 0.1, "transform_seconds": 0.01, "peak_memory_mb": 2.0},
    {"method": "bb", "params": {}, "lds": -0.25, "loo": 0.1, "auc": 0.9,
     "fit_seconds": 12.0, "transform_seconds": 0.5, "peak_memory_mb": 30.0},
]


def test_table_and_json(tmp_path):
    records = RECORDS
    table = format_table(records).splitlines()
    assert table[0].split()[:4] == ["method", "LDS", "LOO", "AUC"]
    assert table[2].split()[:4] == ["a", "0.500", "-", "-"]
    assert table[3].split()[:2] == ["bb", "-0.250"]
    write_json(records, tmp_path / "r.json")
    loaded = json.loads((tmp_path / "r.json").read_text())
    assert loaded[0]["auc"] is None and loaded[1]["lds"] == -0.25


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    plot_results(RECORDS, tmp_path / "r.png", title="t")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_steps_are_recorded_only_for_methods_that_replay_them():
    data = load_setting("digits-mlp", **TINY)
    data.estimator.set_params(max_epochs=2)
    _, plain = train_with_checkpoints(data, n_checkpoints=2)
    assert plain.recorder is None
    model, ckpts = train_with_checkpoints(data, n_checkpoints=2, record_steps=True)
    rec = ckpts.recorder
    n, batch = len(data.y_train), int(data.estimator.batch_size)
    assert rec.n_steps_ == 2 * -(-n // batch)  # every step of both epochs
    assert rec.step_gradients(0).shape[1] == min(512, sum(
        p.numel() for p in model.module_.parameters()))
    # the registry's DVEmb replays them: finite scores, one column per training row
    attr = get_method("dvemb").factory(data, model, ckpts).fit(data.X_train, data.y_train)
    S = attr.transform(data.X_test, data.y_test)
    assert S.shape == (len(data.y_test), n) and np.isfinite(S).all()
    assert get_method("dvemb").records_steps and not get_method("tracin").records_steps


def test_a_method_that_refuses_the_model_is_a_row_with_its_error(monkeypatch, tmp_path):
    from skdattri import InfluenceFunction

    def refused(setting, model, checkpoints):  # a budget no curvature matrix fits in
        return InfluenceFunction(model, solver="explicit", max_memory=1)

    monkeypatch.setattr(_registry, "METHODS", [Method("too-big", refused),
                                                Method("grad-dot", _registry._grad_dot)])
    records = run_benchmark("digits-lr", n_subsets=2, n_loo=0, auc=False,
                            cache_dir=tmp_path, n_jobs=1, verbose=0, **TINY)
    assert [r["method"] for r in records] == ["too-big", "grad-dot"]
    assert records[0]["lds"] is None and "max_memory" in records[0]["error"]
    assert records[0]["error"].startswith("ValueError: ")
    assert np.isfinite(records[1]["lds"]) and "error" not in records[1]
    table = format_table(records)
    assert table.splitlines()[-1].startswith("too-big: ValueError: ")
