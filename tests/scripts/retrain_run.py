"""``python -m tests.scripts.retrain_run MODEL N_JOBS MEMORY OUT``: one LDS ground truth.

Runs :func:`tests.scripts.retrain_models.run` and saves the ground truth to ``OUT``.
The interrupt tests signal it while a fit stalls (see ``retrain_models``).
"""

import sys

from tests.scripts.retrain_models import run

if __name__ == "__main__":
    name, n_jobs, memory, out = sys.argv[1:5]
    run(name, n_jobs=int(n_jobs), memory=memory).save(out)
