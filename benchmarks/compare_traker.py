"""skdattri's TRAK against the reference TRAK (``traker`` 0.3.2) on the digits MLP.

Same trained networks, same data, same LDS ground truth, same projection kind and size;
each library runs in its own process (so the peak memory of one does not hide in the
other's), interleaved, one torch thread. ``fit + transform`` for skdattri, ``featurize +
finalize_features + score + finalize_scores`` for traker (its CPU ``BasicProjector``;
``use_half_precision=False``, as skdattri computes in float32 here). Peak memory is the
process's resident memory above what it used before the attribution started (the
trained models and data are already loaded on both sides).

Rows:
- ``matched``: both with Rademacher projections of ``--proj-dim`` and no regularization
  (traker's ``lambda_reg=0``, its default); the LDS must agree.
- ``matched, disk store``: the same with ``store=`` a temporary directory, as traker keeps
  its features in memory-mapped files under ``save_dir`` (file-backed pages, which the
  peak-memory measure does not count on either side).
- ``skdattri defaults``: ``TRAK(net, checkpoints=...)`` with nothing else set, against the
  same traker run.

Usage::

    pip install traker==0.3.2
    python benchmarks/compare_traker.py [--n-models 1 10] [--proj-dim 512]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


def _problem(n_models):
    """The digits-mlp setting, its ground truth (cached) and ``n_models`` trained nets."""
    import torch
    from sklearn.base import clone

    from skdattri.benchmark import compute_ground_truth
    from skdattri.datasets import load_setting

    torch.set_num_threads(1)
    d = load_setting("digits-mlp", random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gt, _ = compute_ground_truth(d, n_subsets=50, n_loo=0, verbose=0)
        nets = []
        for k in range(n_models):
            net = clone(d.estimator).set_params(module__random_state=k + 1)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(k + 1)
                net.fit(d.X_train, d.y_train)
            nets.append(net)
    return d, gt, nets


def _run_skdattri(d, nets, proj_dim, defaults, disk=False):
    from skdattri import TRAK

    states = [{k: v.detach().clone() for k, v in n.module_.state_dict().items()}
              for n in nets]
    kw = {} if defaults else {"proj_dim": proj_dim, "regularization": 0.0,
                              "proj_type": "rademacher"}
    with tempfile.TemporaryDirectory() as tmp:
        attr = TRAK(nets[0], checkpoints=states if len(states) > 1 else None,
                    random_state=0, store=tmp if disk else None, **kw)
        return attr.fit(d.X_train, d.y_train).transform(d.X_test, d.y_test)


def _run_traker(d, nets, proj_dim):
    import torch
    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    X = torch.as_tensor(np.asarray(d.X_train), dtype=torch.float32)
    y = torch.as_tensor(np.asarray(d.y_train), dtype=torch.long)
    Xq = torch.as_tensor(np.asarray(d.X_test), dtype=torch.float32)
    yq = torch.as_tensor(np.asarray(d.y_test), dtype=torch.long)
    model = copy.deepcopy(nets[0].module_).eval()
    n_params = sum(p.numel() for p in model.parameters())
    batch = 100
    with tempfile.TemporaryDirectory() as tmp:
        projector = BasicProjector(grad_dim=n_params, proj_dim=proj_dim, seed=0,
                                   proj_type=ProjectionType.rademacher, device="cpu",
                                   dtype=torch.float32)
        traker = TRAKer(model=model, task="image_classification", train_set_size=len(y),
                        save_dir=tmp, device="cpu", projector=projector,
                        use_half_precision=False, lambda_reg=0.0,
                        logging_level=40)
        states = [n.module_.state_dict() for n in nets]
        for i, state in enumerate(states):
            traker.load_checkpoint(state, model_id=i)
            for s in range(0, len(y), batch):
                traker.featurize(batch=(X[s:s + batch], y[s:s + batch]),
                                 num_samples=len(y[s:s + batch]))
        traker.finalize_features()
        for i, state in enumerate(states):
            traker.start_scoring_checkpoint(exp_name="q", checkpoint=state, model_id=i,
                                            num_targets=len(yq))
            for s in range(0, len(yq), batch):
                traker.score(batch=(Xq[s:s + batch], yq[s:s + batch]),
                             num_samples=len(yq[s:s + batch]))
        scores = traker.finalize_scores(exp_name="q")
    return np.asarray(scores, dtype=np.float64).T  # traker: (n_train, n_test)


def worker(lib, n_models, proj_dim):
    """Run one library once in this process; print a JSON line."""
    from skdattri.benchmark._memory import _PeakMemory
    from skdattri.metrics import lds_score

    d, gt, nets = _problem(n_models)
    run = {"skdattri": lambda: _run_skdattri(d, nets, proj_dim, False),
           "skdattri-disk": lambda: _run_skdattri(d, nets, proj_dim, False, disk=True),
           "skdattri-defaults": lambda: _run_skdattri(d, nets, proj_dim, True),
           "traker": lambda: _run_traker(d, nets, proj_dim)}[lib]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with _PeakMemory() as mem:
            t0 = time.perf_counter()
            scores = run()
            seconds = time.perf_counter() - t0
    print(json.dumps({"lib": lib, "n_models": n_models, "seconds": seconds,
                      "peak_mb": mem.peak / 2**20, "lds": lds_score(gt, scores)}))


def _spawn(lib, n_models, proj_dim):
    out = subprocess.run([sys.executable, __file__, "--worker", lib, "--n-models",
                          str(n_models), "--proj-dim", str(proj_dim)],
                         capture_output=True, text=True)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode or not lines:
        return {"lib": lib, "error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(lines[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-models", nargs="+", type=int, default=[1, 10])
    parser.add_argument("--proj-dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2,
                        help="interleaved runs per library; the table keeps the fastest")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.n_models[0], args.proj_dim)

    import platform

    import torch
    import trak

    import skdattri

    print(f"# {time.strftime('%Y-%m-%d')} | {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, torch {torch.__version__}, skdattri "
          f"{skdattri.__version__}, traker {trak.__version__}; one torch thread")
    print(f"# command: python benchmarks/compare_traker.py {' '.join(argv or sys.argv[1:])}")
    print("| models | skdattri | LDS | traker LDS | skdattri s | traker s | traker/skdattri "
          "| skdattri MB | traker MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n_models in args.n_models:
        best = {}
        for _ in range(args.repeats):  # interleaved: a load spike hits both sides
            for lib in ("traker", "skdattri", "skdattri-disk", "skdattri-defaults"):
                r = _spawn(lib, n_models, args.proj_dim)
                if "error" in r:
                    print(f"# {lib} failed: {r['error']}", flush=True)
                    continue
                if lib not in best or r["seconds"] < best[lib]["seconds"]:
                    best[lib] = r
        t = best.get("traker")
        matched = f"matched ({args.proj_dim} Rademacher, no reg.)"
        for lib, label in (("skdattri", matched),
                           ("skdattri-disk", f"{matched}, disk store"),
                           ("skdattri-defaults", "defaults")):
            s = best.get(lib)
            if s is None or t is None:
                continue
            print(f"| {n_models} | {label} | {s['lds']:.3f} | {t['lds']:.3f} | "
                  f"{s['seconds']:.2f} | {t['seconds']:.2f} | {t['seconds'] / s['seconds']:.2f}"
                  f" | {s['peak_mb']:.0f} | {t['peak_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
