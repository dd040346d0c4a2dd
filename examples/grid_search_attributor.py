"""Tuning an attributor with GridSearchCV and the linear datamodeling score (LDS).

Attributors are scikit-learn estimators and attribution quality is a scorer, so the usual
model-selection tools choose an attributor's hyper-parameters. Here ``GridSearchCV``
searches the inverse-Hessian solver and the damping of an ``InfluenceFunction`` that
explains a ``LogisticRegression`` on 500 digits.

The pieces:

- :func:`skdattri.ground_truth.lds_ground_truth` retrains the model on 50 random halves
  of the training set and records the loss of 50 query digits under every retrained
  model: what actually happens when the training set changes.
- :func:`skdattri.metrics.make_lds_scorer` turns it into a scorer: the LDS of an
  attributor is the mean, over the queries, of the Spearman correlation between the
  effect its scores predict for each subset and the measured one (1 is perfect).
- :class:`skdattri.model_selection.TrainQuerySplit` hands ``GridSearchCV`` its single
  split: fit the attributor on the training rows, score it on the query rows. Training
  and query rows are concatenated, training rows first.
- ``refit=False``: the search only compares settings; the chosen parameters are then used
  to build the final attributor.

The exact solvers (``"explicit"``, ``"cg"``) agree; ``"arnoldi"`` keeps only the top 50
eigenpairs (``n_components``) of the 650 x 650 Hessian and ``"datainf"`` approximates
the inverse layer by layer: both trade accuracy for speed on models far larger than this
one. Too much damping pulls every solver towards Grad-Dot.

The model is fitted once and passed fitted: every candidate (a ``clone`` of the
attributor) explains that same model and never retrains it.

Run it with ``python examples/grid_search_attributor.py`` (CPU, a few seconds).
"""

import numpy as np
import torch
from sklearn.model_selection import GridSearchCV
from threadpoolctl import threadpool_limits

from skdattri import InfluenceFunction, TracIn
from skdattri.datasets import load_setting
from skdattri.ground_truth import lds_ground_truth
from skdattri.metrics import make_lds_scorer
from skdattri.model_selection import TrainQuerySplit

# These problems are small: one thread per library is fastest, and it keeps idle OpenMP
# threads from spinning against each other on a busy machine.
torch.set_num_threads(1)
threadpool_limits(limits=1)


def main():
    setting = load_setting("digits-lr", random_state=0, n_train=500, n_test=50)
    X_train, y_train = setting.X_train, setting.y_train
    X_query, y_query = setting.X_test, setting.y_test
    model = setting.estimator.fit(X_train, y_train)
    print(f"Model: {model}, fitted on {len(X_train)} digits; {len(X_query)} query digits")

    ground_truth = lds_ground_truth(setting.estimator, X_train, y_train, X_query, y_query,
                                    n_subsets=50, subset_fraction=0.5, random_state=0)
    print(f"Ground truth: {ground_truth}")
    scorer = make_lds_scorer(ground_truth)

    param_grid = {
        "solver": ["explicit", "cg", "arnoldi", "datainf"],
        "regularization": [None, 1e-3, 1e-2, 1e-1],
    }
    search = GridSearchCV(
        InfluenceFunction(model, random_state=0),
        param_grid,
        scoring=scorer,
        cv=TrainQuerySplit(n_train=len(X_train)),
        refit=False,
    )
    search.fit(np.concatenate([X_train, X_query]), np.concatenate([y_train, y_query]))

    results = search.cv_results_
    print()
    print("GridSearchCV results (sorted by LDS, higher is better):")
    print(f"{'rank':>4}  {'solver':<9}{'regularization':>15}{'LDS':>8}")
    for i in np.argsort(results["rank_test_score"], kind="stable"):
        params = results["params"][i]
        regularization = params["regularization"]
        print(f"{results['rank_test_score'][i]:>4}  {params['solver']:<9}"
              f"{str(regularization):>15}{results['mean_test_score'][i]:>8.3f}")
    print()
    print(f"best parameters: {search.best_params_}")
    print(f"best LDS: {search.best_score_:.3f}")

    # The chosen attributor, and Grad-Dot (no Hessian) for comparison, scored the same way.
    best = InfluenceFunction(model, random_state=0, **search.best_params_)
    best.fit(X_train, y_train)
    grad_dot = TracIn(model).fit(X_train, y_train)
    chosen = ", ".join(f"{key}={value!r}" for key, value in search.best_params_.items())
    print(f"LDS of InfluenceFunction({chosen}): {scorer(best, X_query, y_query):.3f}")
    print(f"LDS of TracIn (Grad-Dot, no Hessian):  {scorer(grad_dot, X_query, y_query):.3f}")


if __name__ == "__main__":
    main()
