"""Attribution quality metrics and scorers (higher is better).

- :func:`lds_score` -- linear datamodeling score against an LDS ground truth
- :func:`loo_score` -- leave-one-out correlation against an LOO ground truth
- :func:`mislabel_auc_score` -- ROC AUC of finding flipped labels by self-influence
- :func:`brittleness` -- smallest number of top helpful samples whose removal flips a prediction
- :func:`make_lds_scorer`, :func:`make_loo_scorer`, :func:`make_mislabel_scorer` -- scorers for
  ``GridSearchCV`` over attributors
"""

from ._brittleness import brittleness
from ._correlation import lds_score, loo_score
from ._mislabel import mislabel_auc_score
from ._scorer import make_lds_scorer, make_loo_scorer, make_mislabel_scorer

__all__ = [
    "brittleness",
    "lds_score",
    "loo_score",
    "make_lds_scorer",
    "make_loo_scorer",
    "make_mislabel_scorer",
    "mislabel_auc_score",
]
