"""LDS of skdattri's LoGra and FactGraSS on digits-mlp over projection seeds.

The spread that a single run of ``compare_dattri.py`` (one seed on each side) sits in::

    python benchmarks/logra_seeds.py [--seeds 6] [--cache-dir DIR]

Same trained model, data and ground truth as ``compare_dattri.py``; one torch thread.
This script is not part of the package and is not run by the test suite.
"""

import argparse
import os
import sys
import warnings

import numpy as np
import torch


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import compare_dattri

    from skdattri.logra import LoGra
    from skdattri.metrics import lds_score

    p = compare_dattri.Problem("digits-mlp", False, args.cache_dir)
    for kind, kw in [("logra", {}), ("factgrass", {"proj_type": "grass"})]:
        values = []
        for seed in range(args.seeds):
            attr = LoGra(p.model, random_state=seed, **kw).fit(p.data.X_train, p.data.y_train)
            values.append(lds_score(p.lds_gt, attr.transform(p.data.X_test, p.data.y_test)))
        print(kind, " ".join(f"{v:.3f}" for v in values),
              f"mean {np.mean(values):.3f} sd {np.std(values, ddof=1):.3f}")


if __name__ == "__main__":
    main()
