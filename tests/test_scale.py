"""Scale: top-k answers without the full matrix, sharded fit equal to the serial one."""

import joblib
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from skdattri import InfluenceFunction, TracIn
from skdattri.estimator_checks import assert_scores_close


@pytest.fixture(scope="module")
def lr(digits):
    X, y, _, _ = digits
    return LogisticRegression(max_iter=500).fit(X, y)


def _attributors(lr, make_mlp):
    return [TracIn(lr, batch_size=33), TracIn(lr, normalize=True, batch_size=50),
            InfluenceFunction(lr, solver="explicit", regularization=1e-3, normalize=True),
            InfluenceFunction(make_mlp(seed=0), solver="cg", regularization=1e-2, max_iter=30,
                              loss="cross_entropy")]


@pytest.mark.parametrize("index", range(4))
@pytest.mark.parametrize("block", [None, 7, 64])
def test_top_k_equals_argsort_of_transform(digits, lr, make_mlp, index, block):
    X, y, Xq, yq = digits
    attr = _attributors(lr, make_mlp)[index].fit(X, y)
    S = attr.transform(Xq, yq)
    k = 12
    top = attr.top_k(Xq, yq, k=k, harmful=True, train_block_size=block)
    order = np.argsort(-S, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(top.indices, order)
    np.testing.assert_array_equal(top.scores, np.take_along_axis(S, order, 1))
    worst = np.argsort(S, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(top.harmful_indices, worst)
    np.testing.assert_array_equal(top.harmful_scores, np.take_along_axis(S, worst, 1))
    assert np.all(np.diff(top.scores, axis=1) <= 0)
    plain = attr.top_k(Xq, yq, k=k)
    assert set(plain) == {"indices", "scores"}


def test_top_k_breaks_ties_by_index_and_checks_k(digits, lr):
    X, y, Xq, yq = digits
    X2, y2 = np.concatenate([X, X[:5]]), np.concatenate([y, y[:5]])  # exact duplicates
    attr = TracIn(lr, batch_size=64).fit(X2, y2)
    S = attr.transform(Xq, yq)
    top = attr.top_k(Xq, yq, k=len(y2), train_block_size=16)
    np.testing.assert_array_equal(top.indices, np.argsort(-S, axis=1, kind="stable"))
    for bad in (0, len(y2) + 1, 2.5):
        with pytest.raises(ValueError, match="k must be an integer"):
            attr.top_k(Xq, yq, k=bad)


@pytest.mark.parametrize("make", [
    lambda lr: TracIn(lr, batch_size=30),
    lambda lr: TracIn(lr, batch_size=30, proj_dim=64, proj_type="sjlt", random_state=0),
    lambda lr: InfluenceFunction(lr, solver="datainf", batch_size=30),
])
def test_sharded_fit_equals_serial_fit(digits, lr, make):
    X, y, Xq, yq = digits
    serial = make(lr).fit(X, y)
    sharded = make(lr).set_params(n_jobs=2).fit(X, y)
    assert len(sharded._shards()) > 1
    # shards run in other processes, with other batch boundaries and thread counts: the
    # same numbers up to the round-off of the matrix products
    assert_scores_close(sharded.transform(Xq, yq), serial.transform(Xq, yq), ulps=16)
    assert_scores_close(sharded.self_influence(), serial.self_influence(), ulps=16)


def test_sharded_fit_on_a_dask_cluster(digits, lr):
    distributed = pytest.importorskip("distributed")
    X, y, Xq, yq = digits
    serial = TracIn(lr, batch_size=40).fit(X, y)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster), joblib.parallel_config(backend="dask"):
        sharded = TracIn(lr, batch_size=40, n_jobs=2).fit(X, y)
    assert_scores_close(sharded.transform(Xq, yq), serial.transform(Xq, yq), ulps=16)


STORE_CASES = [
    lambda lr: TracIn(lr, batch_size=45),
    lambda lr: TracIn(lr, normalize=True, proj_dim=32, proj_type="grass", random_state=0,
                      batch_size=45),
    lambda lr: TracIn(lr, proj_dim=16, proj_type="selective_mask", batch_size=45),
    lambda lr: InfluenceFunction(lr, solver="explicit", regularization=1e-3, batch_size=45),
    lambda lr: InfluenceFunction(lr, solver="datainf", batch_size=45),
    lambda lr: InfluenceFunction(lr, solver="cg", hessian="fisher", regularization=1e-2,
                                 batch_size=45, normalize="theta"),
    lambda lr: InfluenceFunction(lr, solver="ekfac", batch_size=45, random_state=0),
]


@pytest.mark.parametrize("make", STORE_CASES)
def test_disk_store_equals_memory_store_and_reloads(digits, lr, make, tmp_path):
    import pickle

    X, y, Xq, yq = digits
    memory = make(lr).fit(X, y)
    disk = make(lr).set_params(store=tmp_path).fit(X, y)
    # (EK-FAC keeps the layer factors of its gradients in the store)
    assert all(type(getattr(G, "factors", G)).__name__ == "DiskStore"
               for G in disk.train_grads_)
    S = memory.transform(Xq, yq)
    np.testing.assert_array_equal(disk.transform(Xq, yq), S)
    np.testing.assert_array_equal(disk.self_influence(), memory.self_influence())
    top = disk.top_k(Xq, yq, k=5, train_block_size=64)
    np.testing.assert_array_equal(top.indices, np.argsort(-S, axis=1, kind="stable")[:, :5])
    again = pickle.loads(pickle.dumps(disk))
    np.testing.assert_array_equal(again.transform(Xq, yq), S)
    # half precision: same scores up to bfloat16's rounding of the stored rows
    half = make(lr).set_params(store=tmp_path, store_dtype="bfloat16").fit(X, y)
    S_half = half.transform(Xq, yq)
    err = np.abs(S_half - S).max() / np.abs(S).max()
    assert 0 < err < 64 * 2.0**-8


def test_a_missing_store_file_gives_a_clear_error(digits, lr, tmp_path):
    import pickle

    X, y, Xq, yq = digits
    attr = TracIn(lr, store=tmp_path).fit(X, y)
    blob = pickle.dumps(attr)
    for path in tmp_path.iterdir():
        path.unlink()
    with pytest.raises(ValueError, match="refit the attributor"):
        pickle.loads(blob).transform(Xq, yq)


def test_top_k_and_disk_store_for_trak_and_representer_points(digits, lr, tmp_path):
    from skdattri import TRAK, RepresenterPoints

    X, y, Xq, yq = digits
    for attr in (TRAK(lr, proj_dim=64, random_state=0, batch_size=37),
                 RepresenterPoints(lr)):
        S = attr.fit(X, y).transform(Xq, yq)
        top = attr.top_k(Xq, yq, k=7, harmful=True, train_block_size=50)
        np.testing.assert_array_equal(top.indices, np.argsort(-S, axis=1, kind="stable")[:, :7])
        np.testing.assert_array_equal(top.harmful_indices,
                                      np.argsort(S, axis=1, kind="stable")[:, :7])
    memory = TRAK(lr, proj_dim=64, random_state=0, batch_size=37).fit(X, y)
    disk = TRAK(lr, proj_dim=64, random_state=0, batch_size=37, store=tmp_path).fit(X, y)
    np.testing.assert_array_equal(disk.transform(Xq, yq), memory.transform(Xq, yq))
    np.testing.assert_array_equal(disk.self_influence(), memory.self_influence())
    assert len(list(tmp_path.glob("*.bin"))) == 1  # Phi was removed once A was written


@pytest.mark.parametrize("proj_type", ["sjlt", "rademacher"])
def test_projected_gradients_of_row_parts_equal_the_whole_batch(digits, make_mlp, monkeypatch,
                                                                proj_type):
    """Projected gradients are formed a few rows at a time (cache-sized parts): the
    scores equal those of whole batches."""
    from skdattri import TRAK, _features

    X, y, Xq, yq = digits
    make = lambda: TRAK(make_mlp(seed=0), loss="cross_entropy", proj_dim=64,  # noqa: E731
                        proj_type=proj_type, batch_size=50, random_state=0)
    whole = make().fit(X, y)
    # parts of 6 rows: 1210 float64 gradient coordinates per row
    monkeypatch.setattr(_features, "_FUSED_BYTES", 8 * 1210 * 6)
    monkeypatch.setattr(_features, "_MIN_FUSED_ROWS", 1)  # the floor of rows per part
    parts = make().fit(X, y)
    assert_scores_close(parts.train_features_[0][:], whole.train_features_[0][:], ulps=100)
    assert_scores_close(parts.transform(Xq, yq), whole.transform(Xq, yq), ulps=1e3)
