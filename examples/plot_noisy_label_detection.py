"""Finding mislabelled training samples by their self-influence.

A training sample whose label is wrong can only be fitted by the model "memorising" it:
nothing else in the training set supports its label, so the sample strongly helps
*itself*. Its self-influence -- the attribution score of the sample on itself as a query,
``attributor.self_influence()`` -- is therefore high, and ranking the training set by
self-influence puts the flipped labels first.

This example uses the ``digits-lr-noisy`` setting of :mod:`skdattri.datasets`: 1000
training digits of which 10% carry a wrong (flipped) label, and a multinomial
``LogisticRegression``. It fits several attributors on the noisy training set and reports,
for each,

- the ROC AUC of separating flipped from clean labels by self-influence
  (:func:`skdattri.metrics.mislabel_auc_score`; 0.5 is a random ranking), and
- the fraction of the flipped labels found by checking only the 10% of training samples
  with the highest self-influence (a random 10% would find 10% of them).

Every attributor follows skdattri's sign convention (a positive score means "helps"), so
for every one of them high self-influence is what flags a suspicious label:

- Grad-Dot (``TracIn`` on the fitted model): the squared norm of the sample's loss
  gradient, large when the model is far from fitting the sample's label;
- ``InfluenceFunction``: the same gradient weighted by the inverse Hessian;
- ``TRAK``: the sample's projected gradient in its own after-kernel;
- ``KNNShapley``: the Shapley value of a sample for itself in a K-nearest-neighbour
  classifier; it is high when the sample's neighbours disagree with its label, since then
  only the sample itself supports that label.

As a baseline without any attribution, the table also ranks the samples by the fitted
model's loss on their own label.

When matplotlib is installed, the fraction of flipped labels found against the fraction
of training samples checked is drawn to ``--output`` (default
``noisy_label_detection.png`` in the current directory).

Run it with ``python examples/plot_noisy_label_detection.py`` (CPU, a few seconds).
"""

import argparse
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from skdattri import TRAK, InfluenceFunction, KNNShapley, TracIn
from skdattri.datasets import load_setting
from skdattri.metrics import mislabel_auc_score

# These problems are small: one thread per library is fastest, and it keeps idle OpenMP
# threads from spinning against each other on a busy machine.
torch.set_num_threads(1)
threadpool_limits(limits=1)


def fraction_found(is_noisy, suspicion, fraction=0.1):
    """Fraction of the noisy samples among the ``fraction`` most suspicious samples."""
    n_checked = int(round(fraction * len(suspicion)))
    checked = np.argsort(-suspicion, kind="stable")[:n_checked]
    return is_noisy[checked].sum() / is_noisy.sum()


def plot_detection(is_noisy, suspicion, output, max_checked=0.2):
    """Fraction of flipped labels found against the fraction of samples checked.

    Returns False when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    n = len(is_noisy)
    checked = np.arange(1, n + 1) / n
    fig, ax = plt.subplots(figsize=(5.5, 4.5), layout="constrained")
    for name, scores in suspicion.items():
        order = np.argsort(-scores, kind="stable")
        found = np.cumsum(is_noisy[order]) / is_noisy.sum()
        auc = mislabel_auc_score(is_noisy, scores)
        ax.plot(checked, found, label=f"{name} (AUC {auc:.3f})")
    ax.plot(checked, np.minimum(checked / is_noisy.mean(), 1), color="black",
            linestyle="--", linewidth=1, label="perfect ranking")
    ax.plot(checked, checked, color="gray", linestyle=":", label="random order")
    ax.set_xlim(0, max_checked)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("fraction of training samples checked (highest self-influence first)")
    ax.set_ylabel("fraction of flipped labels found")
    ax.set_title(f"Finding flipped labels by self-influence\n(digits, {is_noisy.mean():.0%} "
                 "of the training labels flipped)")
    ax.legend(loc="lower right", fontsize=8)
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return True


def main(output):
    setting = load_setting("digits-lr-noisy", random_state=0)
    X_train, y_train, is_noisy = setting.X_train, setting.y_train, setting.is_noisy
    model = setting.estimator.fit(X_train, y_train)
    print(f"Setting: {setting.description}")
    print(f"{len(X_train)} training samples, {is_noisy.sum()} with a flipped label; "
          f"test accuracy of the model: {model.score(setting.X_test, setting.y_test):.3f}")
    print()

    attributors = {
        "Grad-Dot (TracIn)": TracIn(model),
        "InfluenceFunction (explicit)": InfluenceFunction(model, solver="explicit"),
        "TRAK (proj_dim=256)": TRAK(model, proj_dim=256, random_state=0),
        "KNNShapley (K=5)": KNNShapley(n_neighbors=5),
    }
    suspicion = {}
    for name, attributor in attributors.items():
        attributor.fit(X_train, y_train)
        suspicion[name] = attributor.self_influence()  # high = suspicious
    # baseline without attribution: the model's loss on each sample's own label
    proba = model.predict_proba(X_train)
    label_column = np.searchsorted(model.classes_, y_train)
    suspicion["training loss (baseline)"] = -np.log(proba[np.arange(len(y_train)),
                                                          label_column])

    print(f"{'method':<30}{'AUC':>7}{'found in top 10%':>19}")
    for name, scores in suspicion.items():
        auc = mislabel_auc_score(is_noisy, scores)
        found = fraction_found(is_noisy, scores)
        print(f"{name:<30}{auc:>7.3f}{found:>19.2f}")
    print()
    print("AUC: probability that a flipped label ranks above a clean one (0.5 = random).")
    print("found in top 10%: fraction of the flipped labels among the 10% of samples with "
          "the highest self-influence (0.10 = random).")

    if plot_detection(is_noisy, suspicion, output):
        print(f"Figure written to {Path(output).resolve()}")
    else:
        print("matplotlib is not installed: no figure written.")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="noisy_label_detection.png",
                        help="PNG file of the figure (default: %(default)s)")
    main(parser.parse_args().output)
