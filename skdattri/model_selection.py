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


class _OneSplit(BaseCrossValidator):
    """Base of the splitters that yield exactly one (train, test) pair.

    A subclass says which rows go where in ``_indices(n_samples)``.
    """

    def _indices(self, n_samples):
        raise NotImplementedError

    def _iter_test_indices(self, X=None, y=None, groups=None):
        yield self._indices(_n_rows(X))[1]

    def split(self, X, y=None, groups=None):
        """Generate the single (train, test) split.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            The data: for :class:`TrainQuerySplit` the training rows followed by
            the query rows, for :class:`SelfInfluenceSplit` the training data.

        y : array-like of shape (n_samples,), default=None
            Always ignored, exists for compatibility.

        groups : object, default=None
            Always ignored (with a warning when given), exists for compatibility.

        Yields
        ------
        train : ndarray
            The training row indices.

        test : ndarray
            The query row indices (:class:`TrainQuerySplit`), or the training row
            indices again (:class:`SelfInfluenceSplit`).
        """
        if groups is not None:
            warnings.warn(
                f"The groups parameter is ignored by {type(self).__name__}", UserWarning
            )
        yield self._indices(_n_rows(X))

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


class TrainQuerySplit(_OneSplit):
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

    def _indices(self, n_samples):
        if isinstance(self.n_train, bool) or not isinstance(self.n_train, Integral):
            raise TypeError(f"n_train must be an int, got {self.n_train!r}.")
        if not 1 <= self.n_train < n_samples:
            raise ValueError(
                f"n_train={self.n_train} must be at least 1 and smaller than the number "
                f"of samples ({n_samples}), so that query rows follow the training rows."
            )
        return np.arange(self.n_train), np.arange(self.n_train, n_samples)


class SelfInfluenceSplit(_OneSplit):
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

    def _indices(self, n_samples):
        if n_samples < 1:
            raise ValueError("Cannot split an empty data set.")
        indices = np.arange(n_samples)
        return indices, indices.copy()
