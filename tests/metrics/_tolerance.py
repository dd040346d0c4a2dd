"""One float comparison for the metric, scorer and ground-truth tests."""

import numpy as np


def assert_close(actual, desired, *, ulps, scale=None):
    """``assert_allclose`` within ``ulps`` machine epsilons of the values' magnitude.

    The tolerance is ``ulps * eps`` of the less precise float dtype of the two
    (float64 for integer inputs), relative to each entry
    (``rtol``) and to ``scale`` (``atol``): by default the largest ``|desired|``;
    pass the magnitude of the inputs when ``desired`` is a difference or a mean of
    larger numbers. Entries near zero are then held to the rounding error of the
    computation instead of to a relative tolerance they cannot meet.
    """
    actual, desired = np.asarray(actual), np.asarray(desired)
    floats = [a.dtype for a in (actual, desired) if np.issubdtype(a.dtype, np.floating)]
    tol = ulps * max((np.finfo(dtype).eps for dtype in floats), default=np.finfo(float).eps)
    if scale is None:
        scale = np.abs(desired).max(initial=0.0)
    np.testing.assert_allclose(actual, desired, rtol=tol, atol=tol * scale)
