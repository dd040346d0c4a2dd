"""Exact KNN-Shapley data values (Jia et al., 2019)."""

# Authors: The skdattri developers
# SPDX-License-Identifier: BSD-3-Clause

from numbers import Integral

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin, _fit_context, clone
from sklearn.exceptions import NotFittedError
from sklearn.metrics import pairwise_distances
from sklearn.utils._param_validation import HasMethods, Interval
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import (
    _num_samples,
    check_array,
    check_consistent_length,
    check_is_fitted,
    column_or_1d,
    validate_data,
)

from ._utils import _progress

__all__ = ["KNNShapley"]

# Entries of one (block of queries) x (train) working array when batch_size=None, and
# the fewest queries per block: a few small arrays in cache beat one large one (digits,
# 1,000 x 200: peak 12 -> 3.4 MB at the same speed; 30,000 x 300: 175 -> 95 MB, faster)
_AUTO_BLOCK_ELEMENTS = 2**15
_MIN_BLOCK_ROWS = 16


def _knn_shapley_from_distances(D, y_train, y_query, n_neighbors):
    """Exact KNN-Shapley values of all train points for a block of queries.

    Parameters
    ----------
    D : ndarray of shape (n_query, n_train)
        Distances from each query to each train point.
    y_train : ndarray of shape (n_train,)
        Encoded train labels (non-negative ints).
    y_query : ndarray of shape (n_query,)
        Encoded query labels (-1 for a label never seen in training).
    n_neighbors : int
        K of the KNN utility.

    Returns
    -------
    values : ndarray of shape (n_query, n_train)
        Shapley value of train point j for query i, in train order.
    """
    n_train = D.shape[1]
    K = n_neighbors
    # rank train points by (distance, index). A quicksort is ~4x faster than a
    # stable sort; rows that contain tied distances are re-sorted stably, so ties
    # are broken by index.
    order = np.argsort(D, axis=1)
    D_sorted = np.take_along_axis(D, order, axis=1)
    tied = (D_sorted[:, 1:] == D_sorted[:, :-1]).any(axis=1)
    if tied.any():
        order[tied] = np.argsort(D[tied], axis=1, kind="stable")
    del D_sorted
    match = (y_train[order] == y_query[:, None]).astype(np.float64)
    # Theorem 1 of Jia et al. (2019), ranks i = 1..N:
    #   s_N = 1[y_N = y] / N   (for N >= K; see below)
    #   s_i = s_{i+1} + (1[y_i = y] - 1[y_{i+1} = y]) / K * min(K, i) / i
    # i.e. a reverse cumulative sum of the increments.
    # (the paper assumes N >= K; for any N the last value is 1[y_N = y] min(K, N) / (K N),
    # the same coefficient min(K, i) / (K i) as the increments, at i = N)
    rank = np.arange(1, n_train + 1, dtype=np.float64)
    coef = np.minimum(K, rank) / (K * rank)
    sorted_values = np.empty_like(match)
    sorted_values[:, -1] = match[:, -1] * coef[-1]
    increments = (match[:, :-1] - match[:, 1:]) * coef[:-1]
    sorted_values[:, :-1] = (
        sorted_values[:, -1:] + np.cumsum(increments[:, ::-1], axis=1)[:, ::-1]
    )
    values = np.empty_like(sorted_values)
    np.put_along_axis(values, order, sorted_values, axis=1)
    return values


class KNNShapley(TransformerMixin, BaseEstimator):
    """Exact KNN-Shapley values of training samples for query samples.

    For a query ``(x, y)`` the utility of a training subset ``S`` is the
    accuracy-like score of an unweighted K-nearest-neighbour classifier,
    ``U(S) = (1/K) * sum over the min(K, |S|) nearest neighbours of x in S of
    1[label == y]``, and the value of training sample ``j`` is its Shapley value
    for ``U``. Jia et al. (2019) compute all ``n_train`` values of one query
    exactly from the sorted distances in ``O(n_train log n_train)``; here the
    sort and the recursion (a reverse cumulative sum) are vectorised over
    blocks of queries.

    Parameters
    ----------
    n_neighbors : int, default=5
        K of the KNN utility. Values larger than the training set are allowed.
    embedding : None, callable or fitted transformer, default=None
        Features in which neighbours are searched. None: the raw features of
        ``X``; a callable ``X -> features`` (e.g. the penultimate layer of a
        model, numpy arrays or torch tensors are accepted); or a scikit-learn
        transformer, whose ``transform`` is applied to ``X``. A fitted
        transformer is used as it is (and kept by ``clone``); an unfitted one is
        cloned and fitted on the training data in ``fit``.
    metric : str or callable, default="euclidean"
        Distance, any metric accepted by
        :func:`sklearn.metrics.pairwise_distances`.
    batch_size : int or None, default=None
        Number of queries processed at once. None picks a block so that one
        (block, n_train) working array has about 32,768 entries, but at least 16
        queries.
    n_jobs : int or None, default=None
        Parallel jobs for the distance computation (see
        :func:`sklearn.metrics.pairwise_distances`).
    verbose : int, default=0
        Show a progress bar over query blocks when positive.

    Attributes
    ----------
    embedding_ : None, callable or transformer
        The embedding used (a fitted clone when ``embedding`` was unfitted).
    train_features_ : ndarray of shape (n_train, n_embedded_features)
        Embedded training samples.
    classes_ : ndarray of shape (n_classes,)
        Class labels seen in ``fit``.
    n_train_ : int
        Number of training samples.
    n_features_in_ : int
        Number of features of ``X`` seen in ``fit``.
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Names of features seen during fit, when ``X`` has string column names.

    See Also
    --------
    sklearn.neighbors.KNeighborsClassifier : The classifier whose utility is valued.

    Notes
    -----
    ``transform(X, y)`` returns ``S`` of shape (n_query, n_train) with
    ``S[i, j] > 0`` when training sample ``j`` helps classify query ``i``
    correctly. For each query the values sum to ``U(all training samples)``
    (efficiency). The query labels ``y`` are required.

    Ties in distance are broken by training index: among training samples at
    the same (computed) distance, the one with the smaller index counts as
    nearer, for the recursion and for the utility it is exact for.

    Values are exact for any ``n_neighbors``, also larger than the training set:
    the recursion starts from ``1[match] * min(K, N) / (K N)`` for the farthest
    sample (``1[match] / N`` in the paper, which assumes ``N >= K``).

    A query label that never occurs in training gets all-zero values.
    ``self_influence()`` is the diagonal of ``transform(X_train, y_train)``,
    computed block by block without the (n_train, n_train) matrix.

    References
    ----------
    .. [1] Jia, R., Dao, D., Wang, B., Hubis, F. A., Gurel, N. M., Li, B.,
       Zhang, C., Spanos, C. J. and Song, D. "Efficient Task-Specific Data
       Valuation for Nearest Neighbor Algorithms", PVLDB 12(11), 2019.

    Examples
    --------
    >>> import numpy as np
    >>> from skdattri.shapley import KNNShapley
    >>> X = np.array([[0.0], [1.0], [3.0], [4.0]])
    >>> y = np.array([0, 0, 1, 1])
    >>> knn = KNNShapley(n_neighbors=1).fit(X, y)
    >>> knn.transform(np.array([[0.4]]), np.array([0]))
    array([[0.5, 0.5, 0. , 0. ]])
    >>> knn.self_influence()
    array([0.5, 0.5, 0.5, 0.5])
    """

    _parameter_constraints: dict = {
        "n_neighbors": [Interval(Integral, 1, None, closed="left")],
        "embedding": [None, HasMethods(["transform"]), callable],
        "metric": [str, callable],
        "batch_size": [None, Interval(Integral, 1, None, closed="left")],
        "n_jobs": [None, Integral],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        n_neighbors=5,
        *,
        embedding=None,
        metric="euclidean",
        batch_size=None,
        n_jobs=None,
        verbose=0,
    ):
        self.n_neighbors = n_neighbors
        self.embedding = embedding
        self.metric = metric
        self.batch_size = batch_size
        self.n_jobs = n_jobs
        self.verbose = verbose

    # ------------------------------------------------------------------ helpers
    def _validate_X(self, X, y=None, *, reset):
        """validate_data on raw X (numeric unless an embedding interprets it)."""
        if self.embedding is None:
            kwargs = {"dtype": [np.float64, np.float32]}
        else:
            # the embedding decides what it accepts (images, 1-D lists of texts, ...)
            kwargs = {
                "dtype": None, "ensure_2d": False, "allow_nd": True, "ensure_all_finite": False
            }
        if reset:
            return validate_data(self, X, y, **kwargs)
        return validate_data(self, X, reset=False, **kwargs)

    def _embed(self, X):
        """Features in which neighbours are searched, shape (n_samples, n_emb)."""
        embedding = self.embedding_
        if embedding is None:
            features = X
        elif hasattr(embedding, "transform"):
            try:
                features = embedding.transform(X)
            except NotFittedError as exc:
                raise NotFittedError(
                    "The embedding of KNNShapley is not fitted; pass a fitted transformer."
                ) from exc
        else:
            features = embedding(X)
        if hasattr(features, "detach"):  # torch tensor
            features = features.detach().cpu().numpy()
        features = check_array(
            features, dtype=[np.float64, np.float32], input_name="embedded X"
        )
        if features.shape[0] != _num_samples(X):
            raise ValueError(
                f"The embedding returned {features.shape[0]} rows for {_num_samples(X)} samples."
            )
        return features

    def _encode_query_labels(self, y, n_samples):
        if y is None:
            return None
        y = column_or_1d(y, warn=True)
        check_consistent_length(np.empty(n_samples), y)
        if y.dtype.kind in "fc" and not np.all(np.isfinite(y)):
            raise ValueError("Input y contains NaN or infinity.")
        classes = self.classes_
        try:
            pos = np.clip(np.searchsorted(classes, y), 0, len(classes) - 1)
        except TypeError as exc:
            raise ValueError(
                f"The query labels ({y.dtype}) cannot be compared with the training "
                f"labels ({classes.dtype}) seen in fit."
            ) from exc
        return np.where(classes[pos] == y, pos, -1)

    def _block_size(self):
        if self.batch_size is not None:
            return self.batch_size
        return max(_MIN_BLOCK_ROWS, _AUTO_BLOCK_ELEMENTS // max(1, self.n_train_))

    def _blocks(self, n):
        step = self._block_size()
        starts = range(0, n, step)
        for start in _progress(starts, verbose=self.verbose, desc=type(self).__name__):
            yield start, min(start + step, n)

    def _predict_encoded(self, D):
        """Majority vote of the ``n_neighbors`` nearest training samples (encoded).

        Neighbours are ranked by (distance, training index) as in the Shapley values;
        a tie between classes goes to the first class, as in
        :class:`~sklearn.neighbors.KNeighborsClassifier`.
        """
        k = min(self.n_neighbors, self.n_train_)
        nearest = np.argsort(D, axis=1, kind="stable")[:, :k]
        labels = self._y_train_enc[nearest]
        counts = np.zeros((D.shape[0], len(self.classes_)))
        np.add.at(counts, (np.arange(D.shape[0])[:, None], labels), 1.0)
        return counts.argmax(axis=1)

    def _values(self, features, y_enc, start, stop):
        D = pairwise_distances(
            features[start:stop], self.train_features_, metric=self.metric, n_jobs=self.n_jobs
        )
        y_block = self._predict_encoded(D) if y_enc is None else y_enc[start:stop]
        return _knn_shapley_from_distances(D, self._y_train_enc, y_block, self.n_neighbors)

    def _transform_features(self, features, y_enc):
        scores = np.empty((features.shape[0], self.n_train_), dtype=np.float64)
        for start, stop in self._blocks(features.shape[0]):
            scores[start:stop] = self._values(features, y_enc, start, stop)
        return scores

    # --------------------------------------------------------------------- API
    @_fit_context(prefer_skip_nested_validation=False)
    def fit(self, X, y):
        """Store the (embedded) training samples and their labels.

        Parameters
        ----------
        X : array-like of shape (n_train, n_features)
            Training samples (any shape the ``embedding`` accepts when given).
        y : array-like of shape (n_train,)
            Training class labels.

        Returns
        -------
        self : KNNShapley
            The fitted estimator.
        """
        X, y = self._validate_X(X, y, reset=True)
        check_classification_targets(y)
        self.classes_, self._y_train_enc = np.unique(y, return_inverse=True)

        embedding = self.embedding
        if embedding is not None and hasattr(embedding, "fit") and hasattr(
            embedding, "transform"
        ):
            try:
                check_is_fitted(embedding)
            except NotFittedError:
                embedding = clone(embedding).fit(X, y)
        self.embedding_ = embedding
        self.train_features_ = self._embed(X)
        self.n_train_ = self.train_features_.shape[0]
        return self

    def transform(self, X, y=None):
        """KNN-Shapley value of every training sample for every query.

        Parameters
        ----------
        X : array-like of shape (n_query, n_features)
            Query samples.
        y : array-like of shape (n_query,), default=None
            Query labels. Without them the KNN classifier's own predictions (the
            majority label of the ``n_neighbors`` nearest training samples) are used:
            "which training samples made the nearest-neighbour vote come out so?".

        Returns
        -------
        S : ndarray of shape (n_query, n_train)
            ``S[i, j]``: Shapley value of training sample ``j`` for query ``i``
            (positive when ``j`` helps predict ``y[i]``).
        """
        check_is_fitted(self)
        X = self._validate_X(X, reset=False)
        y_enc = self._encode_query_labels(y, _num_samples(X))
        return self._transform_features(self._embed(X), y_enc)

    def fit_transform(self, X, y=None):
        """Fit on ``(X, y)`` and value the training samples for themselves as queries.

        Equal to ``fit(X, y).transform(X, y)``.

        Parameters
        ----------
        X : array-like of shape (n_train, n_features)
            Training samples.
        y : array-like of shape (n_train,)
            Training labels (required).

        Returns
        -------
        S : ndarray of shape (n_train, n_train)
            KNN-Shapley values of the training samples for each of them.
        """
        self.fit(X, y)
        return self._transform_features(self.train_features_, self._y_train_enc)

    def self_influence(self):
        """Value of each training sample for itself as a query.

        The diagonal of ``transform(X_train, y_train)``, computed block by
        block without forming the (n_train, n_train) matrix.

        Returns
        -------
        values : ndarray of shape (n_train,)
            ``values[j] = S[j, j]`` for the training set.
        """
        check_is_fitted(self)
        out = np.empty(self.n_train_, dtype=np.float64)
        y_enc = self._y_train_enc
        for start, stop in self._blocks(self.n_train_):
            block = self._values(self.train_features_, y_enc, start, stop)
            rows = np.arange(stop - start)
            out[start:stop] = block[rows, start + rows]
        return out

    def __sklearn_clone__(self):
        # A fitted embedding is part of the problem definition, not something
        # to relearn: keep it (like sklearn.frozen.FrozenEstimator would).
        embedding = self.embedding
        keep = embedding is not None and hasattr(embedding, "transform")
        if keep and hasattr(embedding, "fit"):
            try:
                check_is_fitted(embedding)
            except NotFittedError:
                keep = False
        if not keep:
            return super().__sklearn_clone__()
        params = self.get_params(deep=False)
        params.pop("embedding")
        params = {k: clone(v, safe=False) for k, v in params.items()}
        return type(self)(embedding=embedding, **params)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        tags.input_tags.allow_nan = False
        return tags
