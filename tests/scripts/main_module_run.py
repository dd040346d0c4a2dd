"""``python main_module_run.py MEMORY OUT LOG``: a module class defined in ``__main__``.

The skorch module ``Net`` and the net class that logs its fits (one line per fit, to
``LOG``) are defined here, in the script's ``__main__``; ``Net`` has no seed of its own.
Runs an LDS ground truth with ``memory=MEMORY`` and ``n_jobs=2`` and saves its values,
the number of retrains and which of them came from the cache to ``OUT``.
"""

import os
import sys

import numpy as np
import torch
from skorch import NeuralNetClassifier

from skdattri.ground_truth import lds_ground_truth


class Net(torch.nn.Module):
    def __init__(self, n_hidden=6):
        super().__init__()
        self.hidden = torch.nn.Linear(4, n_hidden)
        self.out = torch.nn.Linear(n_hidden, 2)

    def forward(self, X):
        return self.out(torch.relu(self.hidden(X)))


class LoggingNet(NeuralNetClassifier):
    def fit(self, X, y=None, **fit_params):
        with open(os.environ["FIT_LOG"], "a") as f:
            f.write(f"{os.getpid()}\n")
        return super().fit(X, y, **fit_params)


if __name__ == "__main__":
    memory, out, os.environ["FIT_LOG"] = sys.argv[1:4]
    rng = np.random.RandomState(0)
    X = rng.normal(size=(40, 4)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    net = LoggingNet(Net, criterion=torch.nn.CrossEntropyLoss, max_epochs=3, lr=0.1,
                     batch_size=8, train_split=None, verbose=0)
    gt = lds_ground_truth(net, X[:30], y[:30], X[30:], y[30:], n_subsets=4, random_state=0,
                          memory=memory, n_jobs=2)
    np.savez(out, values=gt.values, n_retrains=gt.n_subsets,
             from_cache=np.array(gt.provenance["from_cache"]))
