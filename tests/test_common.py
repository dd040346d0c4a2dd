"""scikit-learn's estimator checks on every attributor (built on unfitted models)."""

import torch
from sklearn.linear_model import LogisticRegression
from sklearn.utils.estimator_checks import parametrize_with_checks
from torch import nn

from skdattri import InfluenceFunction, TracIn


class _LazyMLP(nn.Module):
    """Infers its input width, so sklearn's checks can vary n_features."""

    def __init__(self, n_classes=10):
        super().__init__()
        self.hidden = nn.LazyLinear(8)
        self.out = nn.Linear(8, n_classes)

    def forward(self, X):
        return self.out(torch.relu(self.hidden(X)))


def _skorch_net():
    from skorch import NeuralNetClassifier

    return NeuralNetClassifier(_LazyMLP, criterion=nn.CrossEntropyLoss, max_epochs=20, lr=0.2,
                               optimizer=torch.optim.Adam, batch_size=32, train_split=None,
                               verbose=0)


SKORCH_XFAIL = {
    "check_estimators_dtypes": (
        "skorch nets consume inputs as given: integer X is kept as token ids for embedding "
        "models, so a float network fed int64 X fails inside torch"
    ),
    "check_methods_subset_invariance": (
        "float32 network: scores are sums of gradient products, and scoring a subset changes "
        "BLAS blocking; round-off (~1e-7 absolute) exceeds this check's atol=1e-7"
    ),
}


N_ITER_XFAIL = {
    "check_transformer_n_iter": (
        "InfluenceFunction's max_iter bounds the conjugate-gradient / Arnoldi iterations "
        "of its solver, which for 'cg' and 'lissa' run in transform, not in fit; no "
        "n_iter_ is set by fit"
    ),
}


def _expected_failed_checks(estimator):
    from skorch import NeuralNet

    failed = {}
    if isinstance(estimator.estimator, NeuralNet):
        failed.update(SKORCH_XFAIL)
    if isinstance(estimator, InfluenceFunction):
        failed.update(N_ITER_XFAIL)
    return failed


ATTRIBUTORS = [
    TracIn(LogisticRegression()),
    TracIn(LogisticRegression(), normalize=True, target="margin"),
    TracIn(_skorch_net()),
    InfluenceFunction(LogisticRegression(), solver="explicit"),
    # tight tol: the checks compare permuted queries at rtol 1e-7, CG stops at tol
    InfluenceFunction(LogisticRegression(), solver="cg", normalize=True, tol=1e-12,
                      max_iter=500),
    InfluenceFunction(_skorch_net(), solver="ekfac"),
]


@parametrize_with_checks(ATTRIBUTORS, expected_failed_checks=_expected_failed_checks)
def test_sklearn_compatible(estimator, check):
    check(estimator)
