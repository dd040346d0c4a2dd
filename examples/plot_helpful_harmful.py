"""The most helpful and most harmful training images for a few test digits.

A skorch MLP (the ``digits-mlp`` setting: 64-128-64-10 ReLU network trained with SGD on
1000 digits) is explained with Grad-Dot, ``TracIn`` on the trained network: the score of
training image ``j`` for test image ``i`` is the dot product of their loss gradients,
positive when a gradient step on ``j`` lowers the loss of ``i`` (``j`` *helps*) and
negative when it raises it (``j`` *harms*).

For four test digits -- three predicted correctly and one the network gets wrong -- the
figure shows the test image, its five most helpful and its five most harmful training
images, each titled with its label and score. Helpful images are typically examples of
the same digit written the same way; harmful ones are digits of another class that look
like the test digit. For the misclassified digit, the harmful images are the ones that
pulled the network towards its wrong prediction.

The figure is written to ``--output`` (default ``helpful_harmful.png`` in the current
directory); it needs matplotlib. Run it with ``python examples/plot_helpful_harmful.py``
(CPU, a few seconds: most of it trains the network).
"""

import argparse
from pathlib import Path

import matplotlib
import numpy as np
import torch
from threadpoolctl import threadpool_limits

from skdattri import TracIn
from skdattri.datasets import load_setting

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

# These problems are small: one thread per library is fastest, and it keeps idle OpenMP
# threads from spinning against each other on a busy machine.
torch.set_num_threads(1)
threadpool_limits(limits=1)

N_QUERIES = 4
N_SHOWN = 5


def pick_queries(y_test, predicted, n):
    """First test rows of ``n - 1`` different labels predicted right, then one predicted wrong."""
    right = np.flatnonzero(predicted == y_test)
    _, first = np.unique(y_test[right], return_index=True)
    queries = np.sort(right[first])[: n - 1]
    wrong = np.flatnonzero(predicted != y_test)
    return np.concatenate([queries, wrong[:1]]) if len(wrong) else np.sort(right[first])[:n]


def plot(setting, queries, predicted, scores, output):
    """One row per query: the query, its most helpful and its most harmful images."""
    n_cols = 1 + 2 * N_SHOWN
    fig, axes = plt.subplots(len(queries), n_cols, figsize=(1.25 * n_cols + 0.6,
                                                            1.6 * len(queries) + 0.6),
                             gridspec_kw={"wspace": 0.15, "hspace": 0.55})
    shape = setting.image_shape
    for row, (q, pred, s) in enumerate(zip(queries, predicted, scores)):
        order = np.argsort(-s, kind="stable")
        query_color = "black" if pred == setting.y_test[q] else "tab:red"
        panels = [("query", setting.X_test[q],
                   f"test\nlabel {setting.y_test[q]}, pred {pred}", query_color)]
        panels += [("helpful", setting.X_train[j],
                    f"label {setting.y_train[j]}\n{s[j]:+.2f}", "tab:green")
                   for j in order[:N_SHOWN]]
        panels += [("harmful", setting.X_train[j],
                    f"label {setting.y_train[j]}\n{s[j]:+.2f}", "tab:red")
                   for j in order[::-1][:N_SHOWN]]
        for ax, (kind, image, title, color) in zip(axes[row], panels):
            ax.imshow(image.reshape(shape), cmap="gray_r", vmin=0, vmax=1)
            ax.set_title(title, fontsize=9, color=color)
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor(color)
                spine.set_linewidth(2 if kind != "query" else 1)
    # column group headers above the first row
    fig.canvas.draw()
    top = axes[0, 0].get_position().y1 + 0.055
    for first, label, color in [(1, "most helpful training images", "tab:green"),
                                (1 + N_SHOWN, "most harmful training images", "tab:red")]:
        left = axes[0, first].get_position().x0
        right = axes[0, first + N_SHOWN - 1].get_position().x1
        fig.text((left + right) / 2, top, label, ha="center", va="bottom", fontsize=11,
                 color=color, weight="bold")
    fig.suptitle("Grad-Dot (TracIn) on a skorch MLP, digits: which training images "
                 "help or harm each test prediction", fontsize=12, y=0.995)
    fig.savefig(output, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main(output):
    setting = load_setting("digits-mlp", random_state=0)
    X_train, y_train = setting.X_train, setting.y_train
    net = setting.estimator.fit(X_train, y_train)
    print(f"Setting: {setting.description}")
    print(f"test accuracy of the MLP: {net.score(setting.X_test, setting.y_test):.3f}")

    queries = pick_queries(setting.y_test, net.predict(setting.X_test), N_QUERIES)
    X_query, y_query = setting.X_test[queries], setting.y_test[queries]
    predicted = net.predict(X_query)
    attributor = TracIn(net).fit(X_train, y_train)
    scores = attributor.transform(X_query, y_query)  # (N_QUERIES, n_train)

    for q, pred, s in zip(queries, predicted, scores):
        order = np.argsort(-s, kind="stable")
        helpful, harmful = order[:N_SHOWN], order[::-1][:N_SHOWN]
        print(f"test digit #{q} (label {setting.y_test[q]}, predicted {pred}):")
        for kind, rows in [("helpful", helpful), ("harmful", harmful)]:
            items = ", ".join(f"#{j} (label {y_train[j]}, {s[j]:+.2f})" for j in rows)
            print(f"  most {kind}: {items}")
    same_class = np.mean([np.mean(y_train[np.argsort(-s, kind="stable")[:N_SHOWN]] == y)
                          for s, y in zip(scores, y_query)])
    print(f"fraction of the top-{N_SHOWN} helpful images with the test digit's label: "
          f"{same_class:.2f}")

    plot(setting, queries, predicted, scores, output)
    print(f"Figure written to {Path(output).resolve()}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="helpful_harmful.png",
                        help="PNG file of the figure (default: %(default)s)")
    main(parser.parse_args().output)
