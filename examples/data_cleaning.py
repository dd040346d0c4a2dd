"""Data cleaning: remove the training samples that hurt a validation set, then retrain.

Attribution scores say which training samples help or hurt the model's predictions on
given queries. Summed over a held-out validation set they rank the training samples by
how much they harm the model where it matters, and removing the most harmful ones and
retraining can raise the accuracy on new data.

Recipe (``digits-lr-noisy`` setting: 1000 training digits, 10% of them with a flipped
label):

1. Train a ``LogisticRegression`` on the noisy training set. We use ``C=10``, a weaker L2
   penalty than the setting's ``C=1``: the model then fits the flipped labels and loses
   accuracy to them, which is the situation cleaning is meant for (with ``C=1`` the
   model mostly ignores the flipped labels, and the same recipe gains about one point of
   accuracy at most).
2. Score every training sample against 300 validation digits with
   ``InfluenceFunction(solver="explicit")``: ``S[i, j] < 0`` means that training sample
   ``j`` raises the loss of validation digit ``i``.
3. Harm of training sample ``j``: the sum of its negative scores over the validation
   digits (only the harm is counted, so that helping a few digits of its -- wrong --
   label does not hide the damage a flipped sample does to the others).
4. Remove the ``k`` most harmful samples, retrain, and compare the test accuracy (497
   digits seen neither in training nor in validation) with the model trained on all
   samples and with removing ``k`` random samples (mean of 5 draws).

The script prints a table over ``k`` and a summary for ``k = 100`` (the number of flipped
labels, which the cleaning does not know). As a reference it also prints the accuracy of
the same model trained on the true labels, the most that cleaning could recover.

Run it with ``python examples/data_cleaning.py`` (CPU, a few seconds).
"""

import numpy as np
import torch
from sklearn.base import clone
from threadpoolctl import threadpool_limits

from skdattri import InfluenceFunction
from skdattri.datasets import load_setting

# These problems are small: one thread per library is fastest, and it keeps idle OpenMP
# threads from spinning against each other on a busy machine.
torch.set_num_threads(1)
threadpool_limits(limits=1)

N_VALIDATION = 300
N_RANDOM_DRAWS = 5
N_REMOVED = (25, 50, 100, 150)
N_REMOVED_SUMMARY = 100


def test_accuracy(estimator, X_train, y_train, X_test, y_test, keep=None):
    """Retrain a clone on the rows ``keep`` (all rows when None); its test accuracy."""
    if keep is not None:
        X_train, y_train = X_train[keep], y_train[keep]
    return clone(estimator).fit(X_train, y_train).score(X_test, y_test)


def main():
    setting = load_setting("digits-lr-noisy", random_state=0, n_train=1000, n_test=797)
    X_train, y_train, is_noisy = setting.X_train, setting.y_train, setting.is_noisy
    X_val, y_val = setting.X_test[:N_VALIDATION], setting.y_test[:N_VALIDATION]
    X_test, y_test = setting.X_test[N_VALIDATION:], setting.y_test[N_VALIDATION:]
    estimator = clone(setting.estimator).set_params(C=10.0)
    n_train = len(X_train)
    print(f"Setting: {setting.name}: {n_train} training digits ({is_noisy.sum()} with a "
          f"flipped label), {len(X_val)} validation, {len(X_test)} test")
    print(f"Model: {estimator}")

    model = clone(estimator).fit(X_train, y_train)
    baseline = model.score(X_test, y_test)
    oracle = test_accuracy(estimator, X_train, setting.y_train_clean, X_test, y_test)
    print(f"test accuracy, all training samples:                 {baseline:.4f}")
    print(f"test accuracy, true labels (not known in practice):  {oracle:.4f}")
    print()

    # (n_validation, n_train) scores; negative = the training sample hurts the digit
    scores = InfluenceFunction(model, solver="explicit").fit(X_train, y_train).transform(
        X_val, y_val)
    harm = np.minimum(scores, 0.0).sum(axis=0)
    most_harmful_first = np.argsort(harm, kind="stable")

    rng = np.random.RandomState(0)
    random_orders = [rng.permutation(n_train) for _ in range(N_RANDOM_DRAWS)]

    print(f"{'removed':>7}  {'most harmful':>12}  {'random':>8}  {'flipped among removed':>21}")
    results = {}
    for k in N_REMOVED:
        removed = most_harmful_first[:k]
        keep = np.setdiff1d(np.arange(n_train), removed)
        cleaned = test_accuracy(estimator, X_train, y_train, X_test, y_test, keep)
        random = np.mean([
            test_accuracy(estimator, X_train, y_train, X_test, y_test, np.sort(order[k:]))
            for order in random_orders
        ])
        flipped = is_noisy[removed].mean()
        results[k] = cleaned, random
        print(f"{k:>7}  {cleaned:>12.4f}  {random:>8.4f}  {flipped:>21.2f}")
    print()

    cleaned, random = results[N_REMOVED_SUMMARY]
    k = N_REMOVED_SUMMARY
    print(f"baseline accuracy:        {baseline:.4f}  (all {n_train} training samples)")
    print(f"cleaned accuracy:         {cleaned:.4f}  ({k} most harmful samples removed)")
    print(f"random-removal accuracy:  {random:.4f}  ({k} random samples removed, mean of "
          f"{N_RANDOM_DRAWS} draws)")
    print(f"Removing the {k} most harmful samples changes the test accuracy by "
          f"{cleaned - baseline:+.4f}; removing {k} random samples by {random - baseline:+.4f}.")


if __name__ == "__main__":
    main()
