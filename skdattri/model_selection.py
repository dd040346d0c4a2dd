"""Splitters that let scikit-learn's model selection tune attributors.

An attributor is fitted on training rows and scored on query rows. These
splitters hand ``GridSearchCV`` / ``cross_validate`` exactly that one split:

- :class:`TrainQuerySplit` -- the first ``n_train`` rows are the training set
  and the remaining rows the queries (for LDS / LOO scorers);
- :class:`SelfInfluenceSplit` -- every row on both sides (for self-influence
  scorers such as mislabel detection).
"""

import warnings
from numbers import Integral

import numpy as np
from sklearn.model_selection._split import BaseCrossValidator

from ._utils import _n_rows

__all__ = ["SelfInfluenceSplit", "TrainQuerySplit"]


def _warn_groups(splitter, groups):
    if groups is not None:
        warnings.warn(
            f"The groups parameter is ignored by {type(splitter).__name__}", UserWarning
        )


class TrainQuerySplit(BaseCrossValidator):
    """One split: the first ``n_train`` rows train, the rows after them are queries.

    Concatenate the training set and the query set (``X_train`` first) and pass
    this splitter as ``cv=`` so that ``GridSearchCV`` fits the attributor on the
    training rows and scores it on the query rows, in their original order, which
    is what :func:`~skdattri.metrics.make_lds_scorer` and
    :func:`~skdattri.metrics.make_loo_scorer` expect.

    Parameters
    ----------
    n_train : int
        Number of training rows at the start of the data. At least one row must
        follow them.

    See Also
    --------
    SelfInfluenceSplit : Same rows on both sides.
    skdattri.metrics.make_lds_scorer : The scorer to use it with.

    Examples
    --------
    >>> import numpy as np
    >>> from skdattri.model_selection import TrainQuerySplit
    >>> X = np.zeros((5, 2))
    >>> cv = TrainQuerySplit(n_train=3)
    >>> cv
    TrainQuerySplit(n_train=3)
    >>> cv.get_n_splits(X)
    1
    >>> for train, query in cv.split(X):
    ...     print(train, query)
    [0 1 2] [3 4]
    """

    def __init__(self, n_train):
        self.n_train = n_train

    def _check_n_train(self, n_samples):
        if isinstance(self.n_train, bool) or not isinstance(self.n_train, Integral):
            raise TypeError(f"n_train must be an int, got {self.n_train!r}.")
        if not 1 <= self.n_train < n_samples:
            raise ValueError(
                f"n_train={self.n_train} must be at least 1 and smaller than the number "
                f"of samples ({n_samples}), so that query rows follow the training rows."
            )

    def _iter_test_indices(self, X=None, y=None, groups=None):
        n_samples = _n_rows(X)
        self._check_n_train(n_samples)
        yield np.arange(self.n_train, n_samples)

    def split(self, X, y=None, groups=None):
        """Generate the single (train, query) split.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            The training rows followed by the query rows.

        y : array-like of shape (n_samples,), default=None
            Always ignored, exists for compatibility.

        groups : object, default=None
            Always ignored, exists for compatibility.

        Yields
        ------
        train : ndarray of shape (n_train,)
            ``arange(n_train)``.

        query : ndarray of shape (n_samples - n_train,)
            ``arange(n_train, n_samples)``.
        """
        _warn_groups(self, groups)
        n_samples = _n_rows(X)
        self._check_n_train(n_samples)
        yield np.arange(self.n_train), np.arange(self.n_train, n_samples)

    def get_n_splits(self, X=None, y=None, groups=None):
        """Return the number of splits, always 1.

        Parameters
        ----------
        X, y, groups : object
            Always ignored, exist for compatibility.

        Returns
        -------
        n_splits : int
            1.
        """
        return 1


class SelfInfluenceSplit(BaseCrossValidator):
    """One split with every row on both sides, for self-influence scorers.

    The attributor is fitted on all rows and scored on the same rows, as
    :func:`~skdattri.metrics.make_mislabel_scorer` (which uses
    ``self_influence()``) expects.

    See Also
    --------
    TrainQuerySplit : Training rows first, query rows after.
    skdattri.metrics.make_mislabel_scorer : The scorer to use it with.

    Examples
    --------
    >>> import numpy as np
    >>> from skdattri.model_selection import SelfInfluenceSplit
    >>> cv = SelfInfluenceSplit()
    >>> cv
    SelfInfluenceSplit()
    >>> for train, test in cv.split(np.zeros((3, 2))):
    ...     print(train, test)
    [0 1 2] [0 1 2]
    """

    def _iter_test_indices(self, X=None, y=None, groups=None):
        yield np.arange(_n_rows(X))

    def split(self, X, y=None, groups=None):
        """Generate the single split with all rows on both sides.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            The training data.

        y : array-like of shape (n_samples,), default=None
            Always ignored, exists for compatibility.

        groups : object, default=None
            Always ignored, exists for compatibility.

        Yields
        ------
        train : ndarray of shape (n_samples,)
            ``arange(n_samples)``.

        test : ndarray of shape (n_samples,)
            ``arange(n_samples)``, the same rows.
        """
        _warn_groups(self, groups)
        n_samples = _n_rows(X)
        if n_samples < 1:
            raise ValueError("Cannot split an empty data set.")
        indices = np.arange(n_samples)
        yield indices, indices.copy()

    def get_n_splits(self, X=None, y=None, groups=None):
        """Return the number of splits, always 1.

        Parameters
        ----------
        X, y, groups : object
            Always ignored, exist for compatibility.

        Returns
        -------
        n_splits : int
            1.
        """
        return 1
