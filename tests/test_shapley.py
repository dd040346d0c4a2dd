"""Tests of KNNShapley against brute-force Shapley values."""

import pickle
from fractions import Fraction
from itertools import combinations, permutations
from math import factorial

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.decomposition import PCA
from sklearn.exceptions import NotFittedError
from sklearn.preprocessing import StandardScaler

from skdattri.estimator_checks import assert_scores_close
from skdattri.shapley import KNNShapley

# --------------------------------------------------------------------------- oracles


def _knn_utility(subset, sq_dist, y_train, y_query, K):
    """U(S) of Jia et al. (2019): (1/K) * #{label matches among the min(K, |S|) nearest}.

    Nearest by (distance, index): the documented tie rule.
    """
    nearest = sorted(subset, key=lambda j: (sq_dist[j], j))[:K]
    return Fraction(sum(int(y_train[j] == y_query) for j in nearest), K)


def _sq_dists(X_train, x):
    # exact integer arithmetic (the data below have integer coordinates)
    return [sum((int(a) - int(b)) ** 2 for a, b in zip(row, x, strict=True)) for row in X_train]


def _brute_force_subsets(X_train, y_train, x, y_query, K):
    """Shapley values by enumerating all subsets, in exact rational arithmetic."""
    n = len(X_train)
    d = _sq_dists(X_train, x)
    values = []
    for j in range(n):
        others = [i for i in range(n) if i != j]
        total = Fraction(0)
        for size in range(n):
            weight = Fraction(factorial(size) * factorial(n - size - 1), factorial(n))
            for S in combinations(others, size):
                total += weight * (
                    _knn_utility(S + (j,), d, y_train, y_query, K)
                    - _knn_utility(S, d, y_train, y_query, K)
                )
        values.append(total)
    return values


def _brute_force_permutations(X_train, y_train, x, y_query, K):
    """Shapley values as mean marginal contributions over all orderings."""
    n = len(X_train)
    d = _sq_dists(X_train, x)
    values = [Fraction(0)] * n
    for perm in permutations(range(n)):
        prefix = ()
        for j in perm:
            values[j] += _knn_utility(prefix + (j,), d, y_train, y_query, K) - _knn_utility(
                prefix, d, y_train, y_query, K)
            prefix = prefix + (j,)
    return [v / factorial(n) for v in values]


def _jia_loop(D_row, y_train, y_query, K):
    """Theorem 1 of Jia et al. (2019) for one query, written as a plain loop."""
    n = len(D_row)
    order = sorted(range(n), key=lambda j: (D_row[j], j))
    match = [float(y_train[j] == y_query) for j in order]
    s = [0.0] * n
    s[n - 1] = match[n - 1] * min(K, n) / (K * n)  # = match / n when n >= K
    for i in range(n - 2, -1, -1):  # rank i + 1
        s[i] = s[i + 1] + (match[i] - match[i + 1]) / K * min(K, i + 1) / (i + 1)
    out = np.empty(n)
    out[order] = s
    return out


def _tiny_problem(n_train, seed):
    """Integer points on a 3 x 3 grid (many exact ties), three classes."""
    rng = np.random.RandomState(seed)
    X_train = rng.randint(0, 3, size=(n_train, 2)).astype(np.float64)
    y_train = rng.randint(0, 3, size=n_train)
    X_query = np.vstack([rng.randint(0, 3, size=(4, 2)), X_train[:2]]).astype(np.float64)
    y_query = np.concatenate([rng.randint(0, 3, size=4), y_train[:2]])
    return X_train, y_train, X_query, y_query


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("n_train", [1, 2, 5, 7])
@pytest.mark.parametrize("K", [1, 2, 3, 6, 10])
def test_equals_brute_force_shapley(n_train, K):
    X_train, y_train, X_query, y_query = _tiny_problem(n_train, seed=n_train * 31 + K)
    S = KNNShapley(n_neighbors=K, batch_size=4).fit(X_train, y_train).transform(X_query, y_query)
    assert S.shape == (len(X_query), n_train)
    expected = np.array([
        [float(v) for v in _brute_force_subsets(X_train, y_train, x, yq, K)]
        for x, yq in zip(X_query, y_query, strict=True)
    ])
    np.testing.assert_allclose(S, expected, rtol=0, atol=1e-12)
    # efficiency: each row sums to U(whole training set)
    full = [
        float(_knn_utility(range(n_train), _sq_dists(X_train, x), y_train, yq, K))
        for x, yq in zip(X_query, y_query, strict=True)
    ]
    np.testing.assert_allclose(S.sum(1), full, rtol=0, atol=1e-12)


def test_subset_oracle_agrees_with_permutation_oracle():
    X_train, y_train, X_query, y_query = _tiny_problem(5, seed=1)
    for K in (1, 2, 4):
        for x, yq in zip(X_query, y_query, strict=True):
            assert _brute_force_subsets(X_train, y_train, x, yq, K) == (
                _brute_force_permutations(X_train, y_train, x, yq, K))


def test_ties_are_broken_by_training_index():
    X = np.zeros((2, 1))
    query = np.zeros((1, 1))
    # the duplicate with the smaller index counts as nearer
    knn = KNNShapley(n_neighbors=1)
    np.testing.assert_array_equal(knn.fit(X, [0, 1]).transform(query, [0]), [[1.0, 0.0]])
    np.testing.assert_array_equal(knn.fit(X, [1, 0]).transform(query, [0]), [[-0.5, 0.5]])


def test_matches_jia_loop_on_random_data_in_blocks():
    rng = np.random.RandomState(0)
    X_train, y_train = rng.randn(60, 5), rng.randint(0, 4, 60)
    X_query, y_query = rng.randn(13, 5), rng.randint(0, 4, 13)
    from sklearn.metrics import pairwise_distances

    D = pairwise_distances(X_query, X_train)
    for K in (1, 5, 60, 100):
        expected = np.array([_jia_loop(D[i], y_train, y_query[i], K) for i in range(13)])
        for batch_size in (1, 4, None):
            knn = KNNShapley(n_neighbors=K, batch_size=batch_size).fit(X_train, y_train)
            np.testing.assert_allclose(knn.transform(X_query, y_query), expected,
                                       rtol=0, atol=1e-12)


def test_attributor_contract(digits):
    X_train, y_train, X_query, y_query = digits
    X_train, y_train = X_train[:80], y_train[:80]
    knn = KNNShapley(n_neighbors=3, batch_size=7)
    with pytest.raises(NotFittedError):
        knn.transform(X_query, y_query)
    assert knn.fit(X_train, y_train) is knn
    assert knn.n_train_ == 80 and knn.n_features_in_ == 64
    S = knn.transform(X_query, y_query)
    assert S.shape == (40, 80) and np.isfinite(S).all()
    # a training sample of the query's class among its nearest neighbours helps
    for i in range(5):
        nearest = np.argmin(((X_train - X_query[i]) ** 2).sum(1))
        assert (S[i, nearest] > 0) == (y_train[nearest] == y_query[i])
    # one row per query
    np.testing.assert_allclose(knn.transform(X_query[[7, 2]], y_query[[7, 2]]), S[[7, 2]],
                               rtol=0, atol=1e-12)
    # self-influence is the diagonal of transform(X_train, y_train), over several blocks
    S_tt = knn.transform(X_train, y_train)
    np.testing.assert_allclose(knn.self_influence(), np.diag(S_tt), rtol=0, atol=1e-12)
    np.testing.assert_allclose(clone(knn).fit_transform(X_train, y_train), S_tt,
                               rtol=0, atol=1e-12)
    # batch_size does not matter
    for bs in (1, 40, None):
        other = clone(knn).set_params(batch_size=bs).fit(X_train, y_train)
        np.testing.assert_allclose(other.transform(X_query, y_query), S, rtol=0, atol=1e-12)
        np.testing.assert_allclose(other.self_influence(), np.diag(S_tt), rtol=0, atol=1e-12)
    # pickle round trip
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(knn)).transform(X_query, y_query),
                                  S)


def test_skdattri_contract_checks(digits):
    from skdattri.estimator_checks import check_attributor

    X, y, Xq, yq = digits
    check_attributor(KNNShapley(n_neighbors=5), X[:60], y[:60], Xq[:9], yq[:9])


def test_labels_may_be_strings_and_default_to_the_knn_prediction():
    X = np.arange(8, dtype=float).reshape(4, 2)
    y = np.array(["cat", "dog", "dog", "cat"])
    knn = KNNShapley(n_neighbors=2).fit(X, y)
    from sklearn.neighbors import KNeighborsClassifier

    Xq = X + 0.3
    pred = KNeighborsClassifier(n_neighbors=3).fit(X, y).predict(Xq)
    np.testing.assert_array_equal(KNNShapley(n_neighbors=3).fit(X, y).transform(Xq),
                                  KNNShapley(n_neighbors=3).fit(X, y).transform(Xq, pred))
    with pytest.raises(ValueError, match="requires y"):
        KNNShapley().fit(X, None)
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        knn.transform(X, y[:3])
    S = knn.transform(X, y)
    assert_scores_close(S, KNNShapley(n_neighbors=2).fit(X, y == "dog").transform(X, y == "dog"))
    # a label never seen in training: nothing helps, nothing hurts
    np.testing.assert_array_equal(knn.transform(X[:2], ["bird", "cat"])[0], 0.0)
    with pytest.raises(ValueError, match="Unknown label type"):
        KNNShapley().fit(X, [0.5, 1.5, 2.5, 3.5])


def test_embeddings():
    rng = np.random.RandomState(0)
    X_train, y_train = rng.randn(30, 6), rng.randint(0, 2, 30)
    X_query, y_query = rng.randn(5, 6), rng.randint(0, 2, 5)

    def first_two(X):
        return 2.0 * X[:, :2]

    ref = KNNShapley(3).fit(first_two(X_train), y_train).transform(first_two(X_query), y_query)
    S = KNNShapley(3, embedding=first_two).fit(X_train, y_train).transform(X_query, y_query)
    np.testing.assert_array_equal(S, ref)

    # a torch feature extractor (e.g. a penultimate layer) returning tensors
    def torch_features(X):
        return torch.as_tensor(X)[:, :2] * 2.0

    S = KNNShapley(3, embedding=torch_features).fit(X_train, y_train).transform(X_query, y_query)
    np.testing.assert_allclose(S, ref, rtol=0, atol=1e-12)

    # a fitted transformer is used as it is, and clone keeps it
    pca = PCA(n_components=2).fit(X_train[:10])
    knn = KNNShapley(3, embedding=pca).fit(X_train, y_train)
    assert knn.embedding_ is pca
    np.testing.assert_allclose(
        knn.transform(X_query, y_query),
        KNNShapley(3).fit(pca.transform(X_train), y_train).transform(
            pca.transform(X_query), y_query),
        rtol=0, atol=1e-12,
    )
    assert clone(knn).embedding is pca
    # an unfitted transformer is cloned and fitted on the training data
    scaler = StandardScaler()
    knn = KNNShapley(3, embedding=scaler).fit(X_train, y_train)
    assert knn.embedding_ is not scaler and not hasattr(scaler, "mean_")
    assert_scores_close(knn.embedding_.mean_, X_train.mean(0))
    assert clone(knn).embedding is not scaler  # unfitted: cloned as usual


def test_embedding_may_take_non_tabular_input():
    # e.g. texts: the embedding, not KNNShapley, decides what X may be
    texts = np.array(["a", "bb", "ccc", "dddd", "bbb"])
    y = np.array([0, 1, 1, 0, 1])

    def lengths(X):
        return np.array([[float(len(t))] for t in X])

    S = KNNShapley(2, embedding=lengths).fit(texts, y).transform(texts[:2], y[:2])
    ref = KNNShapley(2).fit(lengths(texts), y).transform(lengths(texts[:2]), y[:2])
    np.testing.assert_array_equal(S, ref)
    # labels of another kind than the training labels match nothing
    other = KNNShapley(2).fit(lengths(texts), y).transform(lengths(texts[:2]), ["x", "y"])
    np.testing.assert_array_equal(other, 0.0)
    with pytest.raises(ValueError, match="cannot be compared"):
        KNNShapley(2).fit(lengths(texts), y).transform(
            lengths(texts[:2]), np.array([None, "y"], dtype=object))
