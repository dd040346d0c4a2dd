"""Scale: every Fashion-MNIST training image with a disk store, against the vmap floor.

Run from the repository root (needs Debian's ``dataset-fashion-mnist``)::

    python benchmarks/bench_scale.py                  # all 60,000 training images
    python benchmarks/bench_scale.py --n-train 4000   # a quick run
    python benchmarks/bench_scale.py --interleave     # a floor pass around every step

Model: the 784-128-10 MLP of the ``fashion-mnist-mlp`` setting (101,770 parameters),
seeded, untrained (attribution cost does not depend on the weights). Every measurement
runs in its own process (one torch thread) so its peak resident memory
(``ru_maxrss``) is its own:

- ``floor``: one plain ``torch.func.vmap(grad)`` pass over the training set, gradients
  discarded (what dattri and skdattri's vmap engine compute);
- ``trak``: ``TRAK(proj_type="sjlt", proj_dim=2048, store=<dir>)`` -- fit;
- ``logra``: ``LoGra(store=<dir>)`` (4096 coordinates per layer) -- fit;
- ``grad-dot``: ``TracIn(store=<dir>, store_dtype="bfloat16")`` -- fit (the unprojected
  gradients, 12 GB on disk for 60,000 rows);
- ``grad-dot-topk``: ``top_k`` of 1,000 test queries against every training row of
  ``grad-dot``'s store, streamed from disk;
- ``ekfac``: ``InfluenceFunction(solver="ekfac", store=<dir>)`` -- fit (the training
  side kept as layer factors, 1,050 numbers a row instead of 101,770).

This script is not part of the package and is not run by the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

torch.set_num_threads(1)


def data(n_train, n_test=1000):
    from skdattri.datasets import load_fashion_mnist

    X, y = load_fashion_mnist(kind="train")
    Xq, yq = load_fashion_mnist(kind="t10k")
    X = (X[:n_train].reshape(n_train, -1) / 255.0).astype(np.float32)
    Xq = (Xq[:n_test].reshape(n_test, -1) / 255.0).astype(np.float32)
    return X, y[:n_train].astype(np.int64), Xq, yq[:n_test].astype(np.int64)


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(784, 128), torch.nn.ReLU(),
                               torch.nn.Linear(128, 10))


def floor(X, y, batch_size=256):
    net = model()
    params = {k: v.detach() for k, v in net.named_parameters()}

    def loss(p, x, t):
        out = torch.func.functional_call(net, p, (x[None],))
        return torch.nn.functional.cross_entropy(out, t[None])

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y)
    for s in range(0, len(y), batch_size):
        per_sample(params, Xt[s:s + batch_size], yt[s:s + batch_size])


def attributor(name, store):
    from skdattri import TRAK, InfluenceFunction, LoGra, TracIn

    net = model()
    if name == "ekfac":  # training side as layer factors: 1,050 numbers a sample
        return InfluenceFunction(net, loss="cross_entropy", solver="ekfac", random_state=0,
                                 store=store)
    if name == "trak":
        return TRAK(net, loss="cross_entropy", proj_type="sjlt", proj_dim=2048,
                    random_state=0, store=store)
    if name == "logra":
        return LoGra(net, loss="cross_entropy", random_state=0, store=store)
    return TracIn(net, loss="cross_entropy", store=store, store_dtype="bfloat16")


def child(step, n_train, store):
    X, y, Xq, yq = data(n_train)
    t0 = time.perf_counter()
    if step == "floor":
        floor(X, y)
    elif step == "grad-dot-topk":
        import pickle

        with open(os.path.join(store, "grad-dot.pkl"), "rb") as f:
            attr = pickle.load(f)
        t0 = time.perf_counter()
        top = attr.top_k(Xq, yq, k=10)
        assert top.indices.shape == (len(yq), 10)
    else:
        attr = attributor(step, store).fit(X, y)
        if step == "grad-dot":
            import pickle

            with open(os.path.join(store, "grad-dot.pkl"), "wb") as f:
                pickle.dump(attr, f)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(json.dumps({"step": step, "seconds": seconds, "peak_rss_gib": peak}))


def _row(step, record, ratio):
    print(f"| {step:<14} | {record['seconds']:9.1f} s | peak RSS "
          f"{record['peak_rss_gib']:5.2f} GiB | {ratio} |", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=60000)
    parser.add_argument("--steps", nargs="+",
                        default=["floor", "trak", "logra", "grad-dot", "grad-dot-topk",
                                 "ekfac"])
    parser.add_argument("--store", default=None, help="disk store directory (default: tmp)")
    parser.add_argument("--interleave", action="store_true",
                        help="a floor pass before and after every step; each ratio is "
                             "against the mean of its two floors (for a shared machine)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    store = args.store or tempfile.mkdtemp(prefix="skdattri-bench-")
    if args.child:
        return child(args.child, args.n_train, store)
    print(f"# {time.strftime('%Y-%m-%d')} | python benchmarks/bench_scale.py "
          f"--n-train {args.n_train} | store {store}")
    def run(step):
        out = subprocess.run([sys.executable, __file__, "--child", step, "--n-train",
                              str(args.n_train), "--store", store],
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    results, floors = {}, []
    for step in args.steps:
        if step == "floor":
            continue
        if args.interleave or not floors:
            floors.append(run("floor"))
            _row("floor", floors[-1], "")
        record = run(step)
        if args.interleave:  # the floors just before and just after this step
            floors.append(run("floor"))
            reference = (floors[-2]["seconds"] + floors[-1]["seconds"]) / 2
        else:
            reference = floors[0]["seconds"]
        record["floor_seconds"] = reference
        results[step] = record
        _row(step, record, f"{record['seconds'] / reference:.2f} x floor")
        if args.interleave:
            _row("floor", floors[-1], "")
    if not results and "floor" in args.steps:
        floors.append(run("floor"))
        _row("floor", floors[-1], "")
    results["floor"] = floors
    return results


if __name__ == "__main__":
    main()
