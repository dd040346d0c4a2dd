"""Per-sample gradients: the hook engine against ``vmap(grad)``; Grad-Dot by ghost products.

Run from the repository root::

    python benchmarks/bench_grad_engine.py                   # quick (~1-2 min)
    python benchmarks/bench_grad_engine.py --n-train 60000   # all Fashion-MNIST images
    python benchmarks/bench_grad_engine.py --skip-ghost --clock cpu --baseline ../main

Part 1 -- per-sample-gradient time over a training set, one torch thread, float32,
batches of 256, median of ``--repeats`` passes, for three untrained, seeded models
(cost does not depend on the weights):

- ``digits-mlp``: :class:`skdattri.datasets.MLP` 64-128-64-10 on 1,000 digits;
- ``fmnist-mlp``: 784-128-10 MLP (101,770 parameters) on ``--n-grad`` Fashion-MNIST
  images (Debian's ``dataset-fashion-mnist``; random data of that shape without it);
- ``digits-cnn``: :class:`skdattri.datasets.SmallConvNet` on 1,000 digit images.

Columns: ``hooks`` = ``model_per_sample_grads(engine="hooks", out=<rows>)`` (outer
products from one batched backward pass, written into preallocated rows); ``vmap`` =
``engine="vmap"`` (``torch.func.vmap(grad)``, flattened into the same rows);
``floor`` = bare ``vmap(grad)`` returning its per-parameter dict (what dattri computes);
for scale, ``train step`` = one batched forward and backward pass of the mean loss
(what any hook-based method pays before its per-sample work) and ``fill rows`` =
writing the ``(n, p)`` rows once (the least any method that stores them pays). The
methods run interleaved, one pass of each per repeat, so that a shared machine's load
hits them alike; ``--clock cpu`` times the thread's CPU time instead of the wall clock.
``--baseline DIR`` adds the hook engine of another checkout (its
``skdattri/func/_grad.py``, e.g. the main branch) to the same interleaved run, for a
before/after comparison; ``--skip-ghost`` leaves out part 2.

Part 2 -- unprojected Grad-Dot (``TracIn``) on ``--n-train`` Fashion-MNIST training
images against 1,000 test queries with ghost inner products (no gradient stored):
fit, transform and peak resident memory (``VmHWM``) of its own process; and the
materialised cache (``ghost=False``) on ``--dense-n-train`` images for comparison.

This script is not part of the package and is not run by the test suite.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np
import torch

torch.set_num_threads(1)


def fashion(n_train, n_test=1000):
    try:
        from skdattri.datasets import load_fashion_mnist

        X, y = load_fashion_mnist(kind="train")
        Xq, yq = load_fashion_mnist(kind="t10k")
        source = "Fashion-MNIST"
    except (OSError, ValueError):  # no local files: random data of the same shape
        rng = np.random.default_rng(0)
        X, y = rng.integers(0, 256, (60000, 28, 28)), rng.integers(0, 10, 60000)
        Xq, yq = rng.integers(0, 256, (10000, 28, 28)), rng.integers(0, 10, 10000)
        source = "random (no Fashion-MNIST files)"
    X = (X[:n_train].reshape(n_train, -1) / 255.0).astype(np.float32)
    Xq = (Xq[:n_test].reshape(n_test, -1) / 255.0).astype(np.float32)
    return X, y[:n_train].astype(np.int64), Xq, yq[:n_test].astype(np.int64), source


def fmnist_mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(784, 128), torch.nn.ReLU(),
                               torch.nn.Linear(128, 10))


def cases(n_grad):
    from sklearn.datasets import load_digits

    from skdattri.datasets import MLP, SmallConvNet

    X, y = load_digits(return_X_y=True)
    X, y = (X[:1000] / 16.0).astype(np.float32), y[:1000].astype(np.int64)
    Xf, yf, _, _, source = fashion(n_grad)
    return {
        "digits-mlp": (MLP(n_features=64, hidden_sizes=(128, 64), random_state=0), X, y),
        "fmnist-mlp": (fmnist_mlp(), Xf, yf),
        "digits-cnn": (SmallConvNet(in_shape=(1, 8, 8), random_state=0),
                       X.reshape(-1, 1, 8, 8), y),
    }, source


def _interleaved(fns, repeats, clock):
    """Median time of each of ``fns`` (a dict), one call of each per repeat."""
    now = time.thread_time if clock == "cpu" else time.perf_counter
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = now()
            fn()
            times[k].append(now() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def _baseline_engine(root):
    """``model_per_sample_grads`` of another checkout's ``skdattri/func/_grad.py``
    (loaded as a module of this package, so its relative imports resolve here)."""
    import importlib.util
    from pathlib import Path

    path = Path(root) / "skdattri" / "func" / "_grad.py"
    spec = importlib.util.spec_from_file_location("skdattri.func._grad_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.model_per_sample_grads


def engine_times(module, X, y, repeats, batch_size=256, clock="wall", baseline=None):
    from skdattri.func._grad import model_per_sample_grads
    from skdattri.model import make_model

    model = make_model(module, loss="cross_entropy")
    params = model.named_params()
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y)
    p = sum(v.numel() for v in params.values())
    rows = torch.empty((len(yt), p))
    blocks = [slice(s, min(s + batch_size, len(yt))) for s in range(0, len(yt), batch_size)]

    def run(engine, fn=model_per_sample_grads):
        def go():
            for sl in blocks:
                fn(model, params, Xt[sl], yt[sl], engine=engine, out=rows[sl])
        return go

    def loss(prm, x, t):
        out = torch.func.functional_call(module, prm, (x[None],))
        return torch.nn.functional.cross_entropy(out, t[None])

    bare = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))

    def floor():
        for sl in blocks:
            bare(params, Xt[sl], yt[sl])

    def step():  # what a training step costs: one batched forward and backward pass
        for sl in blocks:
            with torch.enable_grad():
                out = torch.func.functional_call(module, params_live, (Xt[sl],))
                torch.autograd.grad(torch.nn.functional.cross_entropy(out, yt[sl]),
                                    list(params_live.values()))

    def fill():  # writing the rows once, the least any method writing them costs
        for sl in blocks:
            rows[sl].fill_(0.0)

    params_live = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    fns = {"hooks": run("hooks"), "vmap": run("vmap"), "floor": floor, "step": step,
           "fill": fill}
    if baseline is not None:
        fns["baseline"] = run("hooks", baseline)
    with torch.no_grad():
        run("hooks")()  # warm-up
        hooks = rows.clone()
        run("vmap")()
        err = float((hooks - rows).abs().max() / rows.abs().max())
        for fn in fns.values():
            fn()
        return {"p": p, "n": len(yt), "rel_err": err, **_interleaved(fns, repeats, clock)}


def _peak_rss_gib():
    """Peak resident memory of this process since its ``exec`` (``VmHWM``; unlike
    ``ru_maxrss`` it does not inherit the parent's peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # KiB -> GiB
    return float("nan")


def child(step, n_train):
    from skdattri import TracIn, config_context

    X, y, Xq, yq, source = fashion(n_train)
    base = _peak_rss_gib()
    ghost = step == "ghost"
    with config_context(ghost=ghost):
        t0 = time.perf_counter()
        attr = TracIn(fmnist_mlp(), loss="cross_entropy", batch_size=256).fit(X, y)
        fit = time.perf_counter() - t0
        t0 = time.perf_counter()
        S = attr.transform(Xq, yq)
        transform = time.perf_counter() - t0
    assert S.shape == (len(yq), len(y)) and np.isfinite(S).all()
    width = attr.train_grads_[0].shape[1]
    print(json.dumps({"step": step, "n_train": n_train, "fit": fit, "transform": transform,
                      "peak_rss_gib": _peak_rss_gib(), "data_rss_gib": base,
                      "row_width": width, "source": source}))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=10000,
                        help="training images of the ghost Grad-Dot run")
    parser.add_argument("--dense-n-train", type=int, default=1000,
                        help="training images of the materialised Grad-Dot run (0: skip)")
    parser.add_argument("--n-grad", type=int, default=1000,
                        help="Fashion-MNIST images of the per-sample-gradient timing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall clock, or the CPU time of the thread (a shared machine)")
    parser.add_argument("--baseline", default=None,
                        help="checkout whose hook engine to time alongside (before/after)")
    parser.add_argument("--skip-ghost", action="store_true",
                        help="per-sample-gradient timing only (no Grad-Dot part)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child, args.n_train)
    flags = (f"--n-train {args.n_train} --dense-n-train {args.dense_n_train} "
             f"--n-grad {args.n_grad} --repeats {args.repeats} --clock {args.clock}")
    flags += f" --baseline {args.baseline}" if args.baseline else ""
    flags += " --skip-ghost" if args.skip_ghost else ""
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} | python benchmarks/bench_grad_engine.py "
          f"{flags} | torch {torch.__version__}, 1 thread, float32\n")
    models, source = cases(args.n_grad)
    baseline = _baseline_engine(args.baseline) if args.baseline else None
    print(f"Per-sample gradients (fmnist data: {source}; {args.clock} clock, median of "
          f"{args.repeats} interleaved passes)\n")
    head = "| model | n | params | hooks s | vmap s | bare vmap(grad) s | vmap / hooks " \
           "| floor / hooks | max rel. diff | train step s | fill rows s |"
    if baseline is not None:
        head += " baseline hooks s | floor / baseline | baseline / hooks |"
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for name, (module, X, y) in models.items():
        r = engine_times(module, X, y, args.repeats, clock=args.clock, baseline=baseline)
        line = (f"| {name} | {r['n']} | {r['p']:,} | {r['hooks']:.3f} | {r['vmap']:.3f} | "
                f"{r['floor']:.3f} | {r['vmap'] / r['hooks']:.1f}x | "
                f"{r['floor'] / r['hooks']:.1f}x | {r['rel_err']:.1e} | {r['step']:.3f} | "
                f"{r['fill']:.3f} |")
        if baseline is not None:
            line += (f" {r['baseline']:.3f} | {r['floor'] / r['baseline']:.1f}x | "
                     f"{r['baseline'] / r['hooks']:.1f}x |")
        print(line, flush=True)
    if args.skip_ghost:
        return
    print("\nUnprojected Grad-Dot (TracIn) on Fashion-MNIST, 1,000 queries\n")
    print("| path | n_train | row width | fit s | transform s | peak RSS GiB "
          "| after loading the data GiB |")
    print("|---|---|---|---|---|---|---|")
    steps = [("ghost", args.n_train)]
    if args.dense_n_train:
        steps += [("ghost", args.dense_n_train), ("dense", args.dense_n_train)]
    for step, n in steps:
        out = subprocess.run([sys.executable, __file__, "--child", step, "--n-train", str(n)],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {step} | {n} | {r['row_width']:,} | {r['fit']:.1f} | "
              f"{r['transform']:.1f} | {r['peak_rss_gib']:.2f} | {r['data_rss_gib']:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
