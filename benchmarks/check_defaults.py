"""Defaults on digits-lr, the numbers quoted for issue 10.

- LiSSA on its defaults (damping 1e-3) against the explicit solver: mean Spearman of the
  score rows of 20 queries (``tests/test_defaults.py`` asserts >= 0.95 on the same case);
- TRAK's default ``regularization="auto"`` against a grid of its multiples: LDS over the
  runner's 50 retrained half subsets.

Run from the repository root: ``python benchmarks/check_defaults.py``
"""

import warnings

import numpy as np
import torch
from scipy.stats import spearmanr

from skdattri import TRAK, InfluenceFunction
from skdattri.benchmark import compute_ground_truth
from skdattri.datasets import load_setting
from skdattri.metrics import lds_score


def main():
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    s = load_setting("digits-lr", random_state=0)
    X, y = s.X_train, s.y_train
    model = s.estimator.fit(X, y)
    Xq, yq = s.X_test[:20], s.y_test[:20]
    exact = InfluenceFunction(model, solver="explicit", regularization=1e-3).fit(X, y)
    lissa = InfluenceFunction(model, solver="lissa", regularization=1e-3,
                              random_state=0).fit(X, y)
    rho = np.mean([spearmanr(a, b)[0]
                   for a, b in zip(lissa.transform(Xq, yq), exact.transform(Xq, yq))])
    print(f"LiSSA defaults vs explicit, damping 1e-3, 20 queries: mean Spearman {rho:.3f}")

    gt, _ = compute_ground_truth(s, n_subsets=50, n_loo=0)
    default = TRAK(model, random_state=0).fit(X, y)
    lam = float(default.regularization_[0])
    print(f"TRAK default: regularization_={lam:.4g}, LDS "
          f"{lds_score(gt, default.transform(s.X_test, s.y_test)):.3f}")
    for c in [1e-3, 1e-2, 1e-1, 0.3, 1, 3, 10, 100, 1e3]:
        attr = TRAK(model, random_state=0, regularization=c * lam).fit(X, y)
        print(f"  regularization {c:g} x auto: LDS "
              f"{lds_score(gt, attr.transform(s.X_test, s.y_test)):.3f}")


if __name__ == "__main__":
    main()
