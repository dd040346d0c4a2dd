"""Projection speed: every projection type against one ``torch.matmul`` of the same shapes.

The default shapes are those of issue 12: n = 1024 per-sample gradients of the
101,770-parameter MLP 784-128-10 projected to k = 4096 coordinates, float32, on
one CPU thread. For every type the table shows

- ``setup``: the one-time work of the first call (generating and caching the
  dense matrix, hashing the SJLT buckets, drawing a mask), done once per ``fit``;
- ``project``: the best time of one call on the n rows afterwards;
- ``vs matmul``: ``matmul time / project time`` -- the speed relative to
  ``G @ R`` for a random ``R`` of shape (p, k) (the goal for the dense types is
  >= 0.5; the sparse types are faster than the matmul).

``logra`` projects the same MLP's layers with the Kronecker-factored projector
(64 x 64 factor matrices per layer, 2 x 4096 outputs), from the capture
factors ``(a, g)`` (T = 1), and ``logra (full G)`` from the per-layer gradients.

Run::

    python benchmarks/bench_projection.py                # issue 12's shapes (~3 min)
    python benchmarks/bench_projection.py --quick        # small shapes, seconds
    python benchmarks/bench_projection.py --blockwise    # add the above-budget dense path
"""

import argparse
import gc
import time

import torch

from skdattri.func.projection import LayerwiseKroneckerProjector, make_projector

MLP_LAYERS = [(128, 785), (10, 129)]  # (d_out, d_in + bias) of 784-128-10


def _best(fn, repeats):
    """The fastest of ``repeats`` timed calls, in seconds."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def _matmul_time(G, k, gen, repeats):
    """Best time of ``torch.matmul(G, R)`` for a random ``R`` of shape (p, k)."""
    R = torch.randn(G.shape[1], k, generator=gen)
    torch.matmul(G[:8], R)  # warm the BLAS
    return _best(lambda: torch.matmul(G, R), repeats)


def _time_projector(P, data, call, repeats):
    t = time.perf_counter()
    call(P, [x[:1] for x in data])  # the first call builds the cached state
    setup = time.perf_counter() - t
    return setup, _best(lambda: call(P, data), repeats)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="n=256, p/k scaled by 1/8")
    parser.add_argument("--blockwise", action="store_true",
                        help="also time the dense path above the cache budget")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    layers = [(o // 8, i // 8 + 1) for o, i in MLP_LAYERS] if args.quick else MLP_LAYERS
    n = 256 if args.quick else args.n
    k = args.k // 8 if args.quick else args.k
    p = sum(o * i for o, i in layers)
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(n, p, generator=gen)

    t_mm = _matmul_time(G, k, gen, args.repeats)
    print(f"n={n} p={p} k={k} float32, {torch.get_num_threads()} thread(s)")
    print(f"{'projection':<24}{'setup (s)':>11}{'project (s)':>13}{'vs matmul':>11}")
    print(f"{'torch.matmul G @ R':<24}{'-':>11}{t_mm:>13.3f}{1.0:>11.2f}")

    cases = [
        ("gaussian", {"proj_type": "gaussian"}),
        ("rademacher", {"proj_type": "rademacher"}),
        ("sjlt (n_nonzero=1)", {"proj_type": "sjlt"}),
        ("random_mask", {"proj_type": "random_mask"}),
        ("grass (mask 4k)", {"proj_type": "grass"}),
    ]
    if args.blockwise:
        cases.append(("gaussian above budget", {"proj_type": "gaussian", "max_dense_bytes": 0}))
    for name, kwargs in cases:
        P = make_projector(p, k, random_state=0, **kwargs)
        setup, t = _time_projector(P, [G], lambda P, d: P(d[0]), args.repeats)
        print(f"{name:<24}{setup:>11.3f}{t:>13.3f}{t_mm / t:>11.2f}")
        del P
        gc.collect()

    # LoGra on the MLP's layers: factors (a, g) of T = 1, or the per-layer gradients
    factors = [(torch.randn(n, 1, i, generator=gen), torch.randn(n, 1, o, generator=gen))
               for o, i in layers]
    flat = torch.cat([torch.einsum("nto,nti->noi", g, a).reshape(n, -1) for a, g in factors], 1)
    P = LayerwiseKroneckerProjector(layers, k, random_state=0)
    pairs = [x for pair in factors for x in pair]

    def from_factors(P, d):
        return P.project_factors(list(zip(d[0::2], d[1::2])))

    setup, t = _time_projector(P, pairs, from_factors, args.repeats)
    print(f"{'logra (factors)':<24}{setup:>11.3f}{t:>13.3f}{t_mm / t:>11.2f}")
    setup, t = _time_projector(P, [flat], lambda P, d: P(d[0]), args.repeats)
    print(f"{'logra (full G)':<24}{setup:>11.3f}{t:>13.3f}{t_mm / t:>11.2f}")


if __name__ == "__main__":
    main()
