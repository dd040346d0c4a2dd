"""Attributing a scikit-learn Pipeline.

Models are rarely used on raw features: a ``Pipeline`` standardises (or otherwise
transforms) the inputs before the model sees them. skdattri attributes such pipelines in
two ways, and both give the same scores:

(a) **A fitted Pipeline as the estimator.** ``TracIn(pipe)`` with
    ``pipe = Pipeline([("scale", StandardScaler()), ("model", LogisticRegression())])``
    already fitted: the attributor takes the inputs as the pipeline does (raw pixels),
    passes them through the fitted earlier steps and explains the last step. The
    pipeline is used as it is and never retrained.

(b) **An attributor as the last step of a Pipeline.** ``Pipeline([("scale",
    StandardScaler()), ("attr", TracIn(LogisticRegression()))])``: fitting the pipeline
    fits the scaler, then the attributor, which trains its (unfitted) model on the
    scaled data and caches the training gradients. ``pipe.transform(X)`` returns the
    scores for the model's own predictions; to explain given labels, call the
    attributor on the scaled queries, ``pipe[-1].transform(pipe[:-1].transform(X), y)``.

The example prints the most helpful training digits of a few test digits under both and
checks that the two score matrices agree (``LogisticRegression`` trains
deterministically, so both contain the same model).

Run it with ``python examples/attribute_pipeline.py`` (CPU, a few seconds).
"""

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from skdattri import TracIn
from skdattri.datasets import load_setting

# These problems are small: one thread per library is fastest, and it keeps idle OpenMP
# threads from spinning against each other on a busy machine.
torch.set_num_threads(1)
threadpool_limits(limits=1)

N_QUERIES = 3
N_TOP = 5


def print_top_helpful(scores, y_train, y_query):
    """Indices, labels and scores of the ``N_TOP`` most helpful training samples."""
    for i, row in enumerate(scores):
        top = np.argsort(-row, kind="stable")[:N_TOP]
        items = ", ".join(f"#{j} (label {y_train[j]}, {row[j]:+.3f})" for j in top)
        print(f"      test digit {i} (label {y_query[i]}): {items}")


def main():
    setting = load_setting("digits-lr", random_state=0)
    X_train, y_train = setting.X_train, setting.y_train
    X_query, y_query = setting.X_test[:N_QUERIES], setting.y_test[:N_QUERIES]

    # (a) a fitted Pipeline is the estimator that TracIn explains
    pipe = Pipeline([("scale", StandardScaler()),
                     ("model", LogisticRegression(max_iter=1000))])
    pipe.fit(X_train, y_train)
    print(f"(a) TracIn(pipe) with pipe = {pipe}")
    print(f"    test accuracy of the pipeline: "
          f"{pipe.score(setting.X_test, setting.y_test):.3f}")
    scores_a = TracIn(pipe).fit(X_train, y_train).transform(X_query, y_query)
    print(f"    scores of shape {scores_a.shape}; most helpful training digits:")
    print_top_helpful(scores_a, y_train, y_query)
    print()

    # (b) the attributor is the last step; fitting the pipeline trains the model
    attr_pipe = Pipeline([("scale", StandardScaler()),
                          ("attr", TracIn(LogisticRegression(max_iter=1000)))])
    attr_pipe.fit(X_train, y_train)
    print(f"(b) {attr_pipe}")
    scores_b = attr_pipe[-1].transform(attr_pipe[:-1].transform(X_query), y_query)
    print(f"    scores of shape {scores_b.shape}; most helpful training digits:")
    print_top_helpful(scores_b, y_train, y_query)
    # without labels, Pipeline.transform explains the model's own predictions
    scores_pred = attr_pipe.transform(X_query)
    predicted = attr_pipe[-1].estimator_.predict(attr_pipe[:-1].transform(X_query))
    print(f"    pipe.transform(X) explains the predictions {predicted.tolist()} "
          f"(true labels {y_query.tolist()})")
    print()

    same = np.allclose(scores_a, scores_b, rtol=1e-8, atol=1e-10)
    same_top = all(
        np.array_equal(np.argsort(-a, kind="stable")[:N_TOP],
                       np.argsort(-b, kind="stable")[:N_TOP])
        for a, b in zip(scores_a, scores_b)
    )
    print(f"(a) and (b) give the same scores: {same}")
    print(f"(a) and (b) give the same top-{N_TOP} helpful samples: {same_top}")
    if np.array_equal(predicted, y_query):
        same_pred = np.allclose(scores_pred, scores_b, rtol=1e-8, atol=1e-10)
        print(f"all queries are predicted correctly, so pipe.transform(X) gives the same "
              f"scores too: {same_pred}")


if __name__ == "__main__":
    main()
