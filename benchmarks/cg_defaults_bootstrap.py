"""Paired bootstrap of an LDS difference: skdattri's CG on its defaults (Gauss-Newton,
converged) against dattri's CG (exact Hessian, 20 iterations), digits-mlp, damping 0.1.

Both score matrices are computed once; the 50 retrained subsets and the 200 queries are
resampled with replacement (1,000 times) and the difference of the mean LDS recomputed.
Needs dattri (the benchmark extra) and the ground-truth cache of ``compare_dattri.py``::

    python benchmarks/cg_defaults_bootstrap.py --cache-dir /tmp/skd_cache
"""
import argparse
import os
import sys
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare_dattri as cd  # noqa: E402
from dattri.algorithm import influence_function as dif  # noqa: E402

from skdattri.ground_truth import LDSGroundTruth  # noqa: E402
from skdattri.influence import InfluenceFunction  # noqa: E402
from skdattri.metrics import lds_score  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--cache-dir", default=None, help="ground-truth cache")
args = parser.parse_args()
torch.set_num_threads(1)
warnings.simplefilter("ignore")
p = cd.Problem("digits-mlp", False, args.cache_dir)
sk = InfluenceFunction(p.model, solver="cg", regularization=0.1, random_state=0)
S_sk = sk.fit(p.data.X_train, p.data.y_train).transform(p.data.X_test, p.data.y_test)
att = dif.IFAttributorCG(p.task(), max_iter=20, regularization=0.1)
att.cache(p.train_loader())
S_dt = np.asarray(att.attribute(p.train_loader(), p.test_loader(None)).detach().cpu(),
                  dtype=np.float64).T
gt = p.lds_gt
a, b = lds_score(gt, S_sk), lds_score(gt, S_dt)
print(f"LDS skdattri {a:.4f} dattri {b:.4f} diff {a-b:+.4f}")
rng = np.random.default_rng(0)
diffs = []
for _ in range(1000):
    idx = rng.integers(0, gt.n_subsets, gt.n_subsets)
    g = LDSGroundTruth(gt.masks[idx], gt.values[idx], target=gt.target)
    q = rng.integers(0, S_sk.shape[0], S_sk.shape[0])
    da = lds_score(g, S_sk, aggregate=False)[q]
    db = lds_score(g, S_dt, aggregate=False)[q]
    diffs.append(np.nanmean(da) - np.nanmean(db))
diffs = np.array(diffs)
low, high = np.percentile(diffs, [2.5, 97.5])
print(f"bootstrap (subsets and queries, 1000): diff mean {diffs.mean():+.4f}, "
      f"95% interval [{low:+.4f}, {high:+.4f}], P(diff >= 0) = {(diffs >= 0).mean():.2f}")
