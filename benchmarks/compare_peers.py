"""skdattri against every peer library: same trained models, data and ground truth, one run.

Peers (versions pinned in pyproject's ``bench`` extra) and the skdattri method each row is
compared with:

- kronfluence 1.0.1: ``identity`` (no curvature) -> ``TracIn`` on the final model
  (Grad-Dot); ``diagonal`` / ``kfac`` / ``ekfac`` -> ``InfluenceFunction(solver=...)``.
- traker 0.3.2: TRAK-1 (digits-lr, digits-mlp) and TRAK-10 (digits-mlp: ten nets of
  different seeds) -> ``TRAK``.
- pyDVL 0.10: ``CgInfluence``, ``LissaInfluence``, ``ArnoldiInfluence``,
  ``EkfacInfluence``, ``NystroemSketchInfluence`` -> ``InfluenceFunction(solver=...)``;
  ``KNNShapleyValuation`` -> ``KNNShapley``.
- Captum 0.9: ``TracInCP`` -> ``TracIn`` over the training checkpoints,
  ``TracInCPFast`` -> ``TracIn(layers="last")``, ``TracInCPFastRandProj`` ->
  ``TracIn(layers="last", proj_dim=...)``.

(dattri 0.3.0 has its own, longer comparison: ``compare_dattri.py``.)

How it runs. The main process loads each setting (``skdattri.datasets.load_setting``),
trains its model once with 5 checkpoints (``skdattri.benchmark.train_with_checkpoints``;
for TRAK-10 also nine more nets of other seeds), loads or computes the LDS (and, for the
LR, LOO) ground truth (``skdattri.benchmark.compute_ground_truth``, cached under
``--cache-dir``) and pickles all of it. Every (library, method) then runs in a fresh
subprocess that unpickles the very same models and data, so each process's peak memory
is its own; the peer runs first, then the matching skdattri method (interleaved, so a load
spike hits both). One torch thread everywhere. Before the timed part each worker runs one
untimed two-sample ``vmap(grad)`` and one forward/backward pass (torch's one-time costs).

Measured per row: LDS (mean Spearman over the 200 test queries), LOO (LR), ``agree`` =
mean per-query Pearson correlation of the peer's and skdattri's score matrices, fit and
attribute seconds (``time.perf_counter``), peak memory = the largest increase of the
process's anonymous resident memory over fit + attribute (skdattri's ``_PeakMemory``:
``/proc/self/statm`` sampled every millisecond, after ``malloc_trim``), and the ratio
peer / skdattri of the total seconds (> 1: skdattri faster).

What "fit" and "attribute" are for each library: skdattri ``fit`` / ``transform``;
kronfluence ``fit_all_factors`` / ``compute_pairwise_scores``; traker ``featurize`` +
``finalize_features`` / ``score`` + ``finalize_scores``; pyDVL ``fit`` / ``influences``;
Captum the constructor / ``influence``.

Orientation (higher = more helpful). skdattri's scores are "positive = the training
sample lowers the query's loss". kronfluence scores ``grad(measurement)^T H^-1
grad(train loss)`` with the measurement here the query's loss: same sign. traker scores
margins: same sign. pyDVL's ``influences`` is ``<H^-1 grad(test loss), grad(train
loss)>`` (``influence_function_model.py``, ``InfluenceMode.Up``): same sign. Captum's
TracIn is ``sum lr * grad . grad`` (proponents = high): same sign. pyDVL's KNN-Shapley
values are "higher = more valuable": same sign. No peer's scores are flipped; the
``agree`` column, positive in every row of the run in benchmarks/README.md, is the check.

Install (a separate environment: the peers pin numpy < 2, and a plain install of them
would replace the CPU torch by a CUDA build)::

    python3.11 -m venv /work/pvenv
    printf 'torch==2.13.0\\ntorchvision==0.28.0\\n' > constraints.txt
    /work/pvenv/bin/pip install -c constraints.txt -e '.[bench]'

Usage::

    python benchmarks/compare_peers.py [--settings digits-lr digits-mlp]
        [--peers kronfluence traker pydvl captum] [--methods ...] [--cache-dir DIR]

This script is not part of the package and is not run by the test suite.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import pickle
import platform
import subprocess
import sys
import tempfile
import time
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
from _common import agreement  # noqa: E402

PEERS = ("kronfluence", "traker", "pydvl", "captum")
N_CHECKPOINTS = 5
# TRAK projection size (both sides, Rademacher, no regularization); the LR's 650 gradient
# coordinates span about 505 directions, so 512 would leave its kernel singular
TRAK_PROJ = {"lr": 256, "net": 512}
CAPTUM_PROJ = 100        # TracInCPFastRandProj projection_dim (both sides)
KNN_K = 5


# ----------------------------------------------------------------------------------------
# the problem: one setting's data, trained models and ground truth, shared by all workers


def build_problem(name, cache_dir, need_ensemble):
    """Train once, load or compute the ground truth; return a picklable dict."""
    import torch
    from sklearn.base import clone

    from skdattri.benchmark import compute_ground_truth, train_with_checkpoints
    from skdattri.datasets import load_setting
    from skdattri.model import make_model

    d = load_setting(name, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, ckpts = train_with_checkpoints(d, n_checkpoints=N_CHECKPOINTS)
        lds, loo = compute_ground_truth(d, n_subsets=50, n_loo="auto", cache_dir=cache_dir,
                                        verbose=1)
    n = len(d.y_train)
    is_net = hasattr(model, "module_")
    if is_net:
        module = copy.deepcopy(model.module_).eval()
        states = [dict(s) for s in ckpts.states]
        l2 = 0.0
    else:
        module = make_model(model, n_train=n).module
        states = [make_model(c, n_train=n).module.state_dict() for c in ckpts.states]
        # LogisticRegression's own L2 in the mean-loss form: Hessian term 1 / (C n)
        l2 = 1.0 / (float(model.C) * n)
    ensemble = None
    if is_net and need_ensemble:
        ensemble = []
        for k in range(10):
            net = clone(d.estimator).set_params(module__random_state=k + 1)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(k + 1)
                net.fit(d.X_train, d.y_train)
            ensemble.append({a: v.detach().clone() for a, v in net.module_.state_dict().items()})
    return {"name": name, "data": d, "model": model, "ckpt_models": list(ckpts.states),
            "learning_rates": list(ckpts.learning_rates), "module": module,
            "states": states, "l2": l2, "is_net": is_net, "ensemble": ensemble,
            "lds": lds, "loo": loo}


def trak_proj(p):
    return TRAK_PROJ["net" if p["is_net"] else "lr"]


def damping(p):
    """Damping of the curvature solvers: skdattri adds it on top of the LR's own L2
    penalty; the peers, which do not know that penalty, get it folded in."""
    sk = 1e-2 if p["is_net"] else 1e-6
    return sk, sk + p["l2"]


def tensors(p, float32=False):
    import torch

    d = p["data"]
    dtype = torch.float32 if (float32 or p["is_net"]) else torch.float64
    return (torch.as_tensor(np.asarray(d.X_train), dtype=dtype),
            torch.as_tensor(np.asarray(d.y_train), dtype=torch.long),
            torch.as_tensor(np.asarray(d.X_test), dtype=dtype),
            torch.as_tensor(np.asarray(d.y_test), dtype=torch.long))


def fresh_module(p, float32=False):
    m = copy.deepcopy(p["module"]).eval()
    return m.float() if float32 else m


# ----------------------------------------------------------------------------------------
# the rows: (peer, method) -> (peer runner, skdattri runner, settings note)
#
# every runner returns (fit, attribute): two callables, the second returning the score
# matrix (n_test, n_train); the worker times them separately.


def sk_runner(make):
    def run(p):
        attr = make(p)
        d = p["data"]
        holder = {}

        def fit():
            holder["a"] = attr.fit(d.X_train, d.y_train)

        return fit, lambda: holder["a"].transform(d.X_test, d.y_test)
    return run


def sk_method(key, p):
    """The skdattri attributor of a row (``key`` names it; shared by rows that match)."""
    from skdattri import TRAK, InfluenceFunction, KNNShapley, TracIn

    damp, _ = damping(p)
    hess = "fisher" if p["is_net"] else "exact"
    m = p["model"]
    table = {
        "grad-dot": lambda: TracIn(m),
        "diagonal": lambda: InfluenceFunction(m, solver="diagonal", fisher="empirical",
                                              regularization=diag_damping(p)[0]),
        "kfac": lambda: InfluenceFunction(m, solver="kfac", fisher="empirical"),
        "ekfac": lambda: InfluenceFunction(m, solver="ekfac", fisher="empirical"),
        "trak-1": lambda: TRAK(m, proj_dim=trak_proj(p), proj_type="rademacher",
                               regularization=0.0, random_state=0),
        "trak-10": lambda: TRAK(m, checkpoints=p["ensemble"], proj_dim=trak_proj(p),
                                proj_type="rademacher", regularization=0.0, random_state=0),
        "cg": lambda: InfluenceFunction(m, solver="cg", hessian=hess, regularization=damp,
                                        max_iter=50, tol=1e-6),
        "lissa": lambda: InfluenceFunction(m, solver="lissa", hessian=hess,
                                           regularization=damp, depth=200, scale=50.0,
                                           batch_size=64, tol=1e-6, random_state=0),
        "arnoldi": lambda: InfluenceFunction(m, solver="arnoldi", hessian=hess,
                                             regularization=damp, n_components=50,
                                             max_iter=101, random_state=0),
        "ekfac-true": lambda: InfluenceFunction(m, solver="ekfac", fisher="true",
                                                regularization=damping(p)[1],
                                                random_state=0),
        "nystrom": lambda: InfluenceFunction(m, solver="nystrom", hessian=hess,
                                             regularization=damp, n_components=50,
                                             random_state=0),
        "knn-shapley": lambda: KNNShapley(n_neighbors=KNN_K),
        "tracin": lambda: TracIn(m, checkpoints=p["ckpt_models"],
                                 learning_rates=p["learning_rates"]),
        "tracin-last": lambda: TracIn(m, checkpoints=p["ckpt_models"],
                                      learning_rates=p["learning_rates"], layers="last"),
        "tracin-last-proj": lambda: TracIn(m, checkpoints=p["ckpt_models"],
                                           learning_rates=p["learning_rates"],
                                           layers="last", proj_dim=CAPTUM_PROJ,
                                           random_state=0),
    }
    return table[key]()


def diag_damping(p):
    """The diagonal preconditioner's damping (skdattri, peer)."""
    sk = 1e-3 if p["is_net"] else 1e-6
    return sk, sk + p["l2"]


# --- kronfluence ---------------------------------------------------------------------


def run_kronfluence(strategy):
    def run(p):
        import logging

        import torch
        import torch.nn.functional as F
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.task import Task
        from kronfluence.utils.dataset import DataLoaderKwargs
        from torch.utils.data import TensorDataset

        class _Classification(Task):
            def compute_train_loss(self, batch, model, sample=False):
                x, y = batch
                logits = model(x)
                if sample:  # true Fisher: labels drawn from the model
                    with torch.no_grad():
                        y = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
                return F.cross_entropy(logits, y, reduction="sum")

            def compute_measurement(self, batch, model):
                x, y = batch  # the query's loss: scores have skdattri's sign
                return F.cross_entropy(model(x), y, reduction="sum")

        Xtr, ytr, Xte, yte = tensors(p)
        dtype = Xtr.dtype
        task = _Classification()
        model = prepare_model(fresh_module(p), task)
        tmp = tempfile.mkdtemp(prefix="kron-")
        analyzer = Analyzer(analysis_name="peers", model=model, task=task, cpu=True,
                            disable_tqdm=True, output_dir=tmp, log_level=logging.ERROR)
        analyzer.set_dataloader_kwargs(DataLoaderKwargs(num_workers=0))
        dtypes = {f: dtype for f in ("activation_covariance_dtype",
                                     "gradient_covariance_dtype", "per_sample_gradient_dtype",
                                     "lambda_dtype")}
        fargs = FactorArguments(strategy=strategy, use_empirical_fisher=True, **dtypes)
        damp = diag_damping(p)[1] if strategy == "diagonal" else None
        sargs = ScoreArguments(damping_factor=damp, per_sample_gradient_dtype=dtype,
                               precondition_dtype=dtype, score_dtype=dtype)
        train, query = TensorDataset(Xtr, ytr), TensorDataset(Xte, yte)

        def fit():
            analyzer.fit_all_factors("f", dataset=train, per_device_batch_size=256,
                                     factor_args=fargs, overwrite_output_dir=True)

        def attribute():
            analyzer.compute_pairwise_scores(
                "s", "f", query_dataset=query, train_dataset=train,
                per_device_query_batch_size=len(yte), per_device_train_batch_size=256,
                score_args=sargs, overwrite_output_dir=True)
            return analyzer.load_pairwise_scores("s")["all_modules"]

        return fit, attribute
    return run


# --- traker ----------------------------------------------------------------------------


def run_traker(n_models):
    def run(p):
        import torch
        from trak import TRAKer
        from trak.projectors import BasicProjector, ProjectionType

        # traker's features and projector are float32: the LR gets a float32 copy
        Xtr, ytr, Xte, yte = tensors(p, float32=True)
        model = fresh_module(p, float32=True)
        states = ([fresh_module(p, float32=True).state_dict()] if n_models == 1
                  else p["ensemble"])
        n_params = sum(q.numel() for q in model.parameters())
        batch = 100
        tmp = tempfile.mkdtemp(prefix="traker-")
        projector = BasicProjector(grad_dim=n_params, proj_dim=trak_proj(p), seed=0,
                                   proj_type=ProjectionType.rademacher, device="cpu",
                                   dtype=torch.float32)
        traker = TRAKer(model=model, task="image_classification", train_set_size=len(ytr),
                        save_dir=tmp, device="cpu", projector=projector,
                        use_half_precision=False, lambda_reg=0.0, logging_level=40)

        def fit():
            for i, state in enumerate(states):
                traker.load_checkpoint(state, model_id=i)
                for s in range(0, len(ytr), batch):
                    traker.featurize(batch=(Xtr[s:s + batch], ytr[s:s + batch]),
                                     num_samples=len(ytr[s:s + batch]))
            traker.finalize_features()

        def attribute():
            for i, state in enumerate(states):
                traker.start_scoring_checkpoint(exp_name="q", checkpoint=state, model_id=i,
                                                num_targets=len(yte))
                for s in range(0, len(yte), batch):
                    traker.score(batch=(Xte[s:s + batch], yte[s:s + batch]),
                                 num_samples=len(yte[s:s + batch]))
            return np.asarray(traker.finalize_scores(exp_name="q")).T  # (train, test)

        return fit, attribute
    return run


# --- pyDVL -----------------------------------------------------------------------------


def run_pydvl(kind):
    def run(p):
        import torch
        import torch.nn.functional as F
        from pydvl.influence.torch import (
            ArnoldiInfluence,
            CgInfluence,
            EkfacInfluence,
            LissaInfluence,
            NystroemSketchInfluence,
            SecondOrderMode,
        )
        from torch.utils.data import DataLoader, TensorDataset

        # pyDVL's EK-FAC builds its factors in float32 whatever the model: a float32 copy
        f32 = kind == "ekfac"
        Xtr, ytr, Xte, yte = tensors(p, float32=f32)
        model = fresh_module(p, float32=f32)
        _, damp = damping(p)
        # pyDVL's GAUSS_NEWTON is the empirical Fisher (mean outer product of the
        # gradients, batch_operation.py): skdattri's hessian="fisher" on the MLP
        mode = SecondOrderMode.GAUSS_NEWTON if p["is_net"] else SecondOrderMode.HESSIAN
        full = DataLoader(TensorDataset(Xtr, ytr), batch_size=len(ytr))
        loss = F.cross_entropy
        if kind == "cg":
            inf = CgInfluence(model, loss, regularization=damp, maxiter=50, rtol=1e-6,
                              atol=1e-12, solve_simultaneously=True,
                              warn_on_max_iteration=False, second_order_mode=mode)
        elif kind == "lissa":
            full = DataLoader(TensorDataset(Xtr, ytr), batch_size=64, shuffle=True,
                              generator=torch.Generator().manual_seed(0))
            inf = LissaInfluence(model, loss, regularization=damp, maxiter=200, scale=50.0,
                                 rtol=1e-6, warn_on_max_iteration=False,
                                 second_order_mode=mode)
        elif kind == "arnoldi":
            inf = ArnoldiInfluence(model, loss, regularization=damp, rank=50,
                                   second_order_mode=mode)
        elif kind == "ekfac":
            full = DataLoader(TensorDataset(Xtr, ytr), batch_size=256)
            inf = EkfacInfluence(model, update_diagonal=True, hessian_regularization=damp)
        elif kind == "nystrom":
            torch.manual_seed(0)
            inf = NystroemSketchInfluence(model, loss, regularization=damp, rank=50,
                                          second_order_mode=mode)
        else:  # pragma: no cover
            raise ValueError(kind)
        holder = {}

        def fit():
            holder["inf"] = inf.fit(full)

        return fit, lambda: holder["inf"].influences(Xte, yte, Xtr, ytr)
    return run


def run_pydvl_knn(p):
    from pydvl.valuation.dataset import Dataset
    from pydvl.valuation.methods.knn_shapley import KNNShapleyValuation
    from sklearn.neighbors import KNeighborsClassifier

    d = p["data"]
    Xtr, ytr = np.asarray(d.X_train), np.asarray(d.y_train)
    Xte, yte = np.asarray(d.X_test), np.asarray(d.y_test)
    train = Dataset(Xtr, ytr)

    def attribute():
        # pyDVL returns the values averaged over its test set: the per-query matrix the
        # LDS needs takes one valuation per query (its public API)
        out = np.empty((len(yte), len(ytr)))
        for i in range(len(yte)):
            val = KNNShapleyValuation(KNeighborsClassifier(n_neighbors=KNN_K),
                                      test_data=Dataset(Xte[i:i + 1], yte[i:i + 1]),
                                      progress=False).fit(train)
            r = val.result
            out[i, np.asarray(r.indices, dtype=int)] = r.values
        return out

    return (lambda: None), attribute


# --- Captum ----------------------------------------------------------------------------


def run_captum(kind):
    def run(p):
        import torch
        from captum.influence import TracInCP, TracInCPFast, TracInCPFastRandProj
        from captum.influence._utils.nearest_neighbors import NearestNeighbors
        from torch.utils.data import TensorDataset

        Xtr, ytr, Xte, yte = tensors(p)
        model = fresh_module(p)
        tmp = tempfile.mkdtemp(prefix="captum-")
        paths = []
        for i, (state, lr) in enumerate(zip(p["states"], p["learning_rates"])):
            paths.append(os.path.join(tmp, f"ckpt{i}.pt"))
            torch.save({"state": state, "lr": float(lr)}, paths[-1])

        def load(m, path):
            ck = torch.load(path, weights_only=False)
            m.load_state_dict(ck["state"])
            return ck["lr"]

        last = [n for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)][-1]
        train = TensorDataset(Xtr, ytr)
        loss = torch.nn.CrossEntropyLoss(reduction="sum")
        holder = {}

        class _NoIndex(NearestNeighbors):
            """The influence-score mode needs no nearest-neighbour index (the default
            needs the ``annoy`` package and only serves the top-k mode)."""

            def setup(self, data):
                pass

            def get_nearest_neighbors(self, query, k):  # pragma: no cover
                raise NotImplementedError

        def fit():
            if kind == "tracincp":
                holder["t"] = TracInCP(model, train, paths, checkpoints_load_func=load,
                                       loss_fn=loss, batch_size=256,
                                       sample_wise_grads_per_batch=True)
            elif kind == "fast":
                holder["t"] = TracInCPFast(model, last, train, paths,
                                           checkpoints_load_func=load, loss_fn=loss,
                                           batch_size=256)
            else:
                holder["t"] = TracInCPFastRandProj(
                    model, getattr_path(model, last), train, paths,
                    checkpoints_load_func=load, loss_fn=loss, batch_size=256,
                    nearest_neighbors=_NoIndex(), projection_dim=CAPTUM_PROJ, seed=0)

        return fit, lambda: holder["t"].influence((Xte, yte), k=None)
    return run


def getattr_path(module, name):
    return dict(module.named_modules())[name]


def rows_for(p):
    """(peer, method, peer runner, skdattri key, settings note) of a setting."""
    damp, peer_damp = damping(p)
    dd, peer_dd = diag_damping(p)
    hess = "empirical Fisher" if p["is_net"] else "exact Hessian"
    lr_note = "" if p["is_net"] else f" (+ LR's L2 {p['l2']:g}; peer: {peer_damp:g} on all)"
    rows = [
        ("kronfluence", "identity", run_kronfluence("identity"), "grad-dot",
         "no curvature, loss measurement = skdattri TracIn on the final model"),
        ("kronfluence", "diagonal", run_kronfluence("diagonal"), "diagonal",
         f"empirical Fisher diagonal, damping {dd:g}"
         + ("" if p["is_net"] else f" (+ L2; kronfluence {peer_dd:g})")),
        ("kronfluence", "kfac", run_kronfluence("kfac"), "kfac",
         "empirical Fisher, damping 0.1 x mean eigenvalue per layer (both)"),
        ("kronfluence", "ekfac", run_kronfluence("ekfac"), "ekfac",
         "empirical Fisher, damping 0.1 x mean eigenvalue per layer (both)"),
        ("traker", "trak-1", run_traker(1), "trak-1",
         f"1 model, {trak_proj(p)} Rademacher, no reg."
         + ("" if p["is_net"] else "; traker in float32")),
    ]
    if p["is_net"]:
        rows.append(("traker", "trak-10", run_traker(10), "trak-10",
                     f"10 nets (seeds 1-10), {trak_proj(p)} Rademacher, no reg."))
    rows += [
        ("pydvl", "cg", run_pydvl("cg"), "cg",
         f"{hess}, damping {damp:g}{lr_note}, <= 50 iterations, rtol 1e-6; pyDVL block CG"
         " on one full batch"),
        ("pydvl", "lissa", run_pydvl("lissa"), "lissa",
         f"{hess}, damping {damp:g}{lr_note}, depth 200, scale 50, batch 64"),
        ("pydvl", "arnoldi", run_pydvl("arnoldi"), "arnoldi",
         f"{hess}, damping {damp:g}{lr_note}, rank 50 (Krylov 101)"),
        ("pydvl", "ekfac", run_pydvl("ekfac"), "ekfac-true",
         f"true Fisher, refitted eigenvalues, damping {peer_damp:g} (both)"
         + ("" if p["is_net"] else "; pyDVL in float32 (its only dtype)")),
        ("pydvl", "nystrom", run_pydvl("nystrom"), "nystrom",
         f"{hess}, damping {damp:g}{lr_note}, rank 50"),
        ("pydvl", "knn-shapley", run_pydvl_knn, "knn-shapley",
         f"k={KNN_K}, raw features; pyDVL: one valuation per query"),
        ("captum", "tracincp", run_captum("tracincp"), "tracin",
         f"{N_CHECKPOINTS} checkpoints, full gradients, batch 256"),
        ("captum", "tracincp-fast", run_captum("fast"), "tracin-last",
         f"{N_CHECKPOINTS} checkpoints, last layer (Captum: its weight only; skdattri: "
         "weight + bias)"),
        ("captum", "tracincp-fast-randproj", run_captum("randproj"), "tracin-last-proj",
         f"{N_CHECKPOINTS} checkpoints, last layer projected to {CAPTUM_PROJ} (Captum: "
         "two Gaussian factors, 10 x 10; skdattri: one Gaussian)"),
    ]
    return rows


# ----------------------------------------------------------------------------------------
# worker: one (library, method) in this process


def _warm_up(p):
    import torch

    Xtr, ytr, _, _ = tensors(p)
    m = fresh_module(p)
    params = {k: v.detach() for k, v in m.named_parameters()}

    def one(q, x, y):
        out = torch.func.functional_call(m, q, (x.unsqueeze(0),))
        return torch.nn.functional.cross_entropy(out, y.unsqueeze(0))

    torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))(params, Xtr[:2], ytr[:2])
    torch.nn.functional.cross_entropy(m(Xtr[:2]), ytr[:2]).backward()


def worker(problem_path, lib, method, out_dir):
    import torch

    torch.set_num_threads(1)
    from skdattri.benchmark._memory import _PeakMemory

    with open(problem_path, "rb") as f:
        p = pickle.load(f)
    try:
        if lib == "skdattri":
            runner = sk_runner(lambda q: sk_method(method, q))
        else:
            runner = {r[:2]: r[2] for r in rows_for(p)}[(lib, method)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _warm_up(p)
            fit, attribute = runner(p)
            with _PeakMemory() as mem:
                t0 = time.perf_counter()
                fit()
                t1 = time.perf_counter()
                scores = attribute()
                t2 = time.perf_counter()
        if isinstance(scores, torch.Tensor):
            scores = scores.detach().cpu().numpy()
        scores = np.asarray(scores, dtype=np.float64)
        n_test, n_train = len(p["data"].y_test), len(p["data"].y_train)
        if scores.shape == (n_train, n_test):
            scores = scores.T
        if scores.shape != (n_test, n_train):
            raise RuntimeError(f"score matrix of shape {scores.shape}")
        path = os.path.join(out_dir, f"{lib}-{method}.npy")
        np.save(path, scores)
        out = {"fit": t1 - t0, "attribute": t2 - t1, "peak_mb": mem.peak / 2**20,
               "scores": path}
    except Exception as exc:  # a peer that raises gets a row saying so
        import traceback

        traceback.print_exc()
        first = (str(exc).strip().splitlines() or [""])[0]
        out = {"error": f"{type(exc).__name__}: {first}"[:160]}
    print("RESULT " + json.dumps(out), flush=True)


def spawn(problem_path, lib, method, out_dir):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", problem_path, lib, method,
           out_dir]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    except subprocess.TimeoutExpired:
        return {"error": "timed out after 900 s"}
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    if lines:
        return json.loads(lines[-1][len("RESULT "):])
    err = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    return {"error": f"exit {res.returncode}: " + (err[-1] if err else "no output")[:160]}


# ----------------------------------------------------------------------------------------


def machine():
    from importlib.metadata import PackageNotFoundError, version

    import sklearn
    import torch
    from _common import cpu_name

    import skdattri

    name = cpu_name()
    peers = []
    for dist in ("kronfluence", "traker", "pyDVL", "captum"):
        try:
            peers.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            peers.append(f"{dist} not installed")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{name}, {os.cpu_count()} cores (load {load:.1f}); Python "
            f"{platform.python_version()}, torch {torch.__version__}, scikit-learn "
            f"{sklearn.__version__}, skdattri {skdattri.__version__}; " + ", ".join(peers)
            + "; one torch thread")


def _fmt(x, spec):
    return "—" if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, spec)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=["digits-lr", "digits-mlp"])
    parser.add_argument("--peers", nargs="+", default=list(PEERS), choices=PEERS)
    parser.add_argument("--methods", nargs="+", default=None,
                        help="only these peer methods (e.g. ekfac cg tracincp)")
    parser.add_argument("--cache-dir", default=None, help="ground-truth cache")
    parser.add_argument("--worker", nargs=4, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(*args.worker)

    import torch

    torch.set_num_threads(1)
    from skdattri.metrics import lds_score, loo_score

    print(f"# {datetime.date.today().isoformat()} | {machine()}")
    print(f"# command: python benchmarks/compare_peers.py {' '.join(argv or sys.argv[1:])}",
          flush=True)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="peers-") as tmp:
        for name in args.settings:
            p = build_problem(name, args.cache_dir,
                              need_ensemble="traker" in args.peers)
            path = os.path.join(tmp, f"{name}.pkl")
            with open(path, "wb") as f:
                pickle.dump(p, f)
            n_params = sum(q.numel() for q in p["module"].parameters())
            print(f"\n## {name}: {len(p['data'].y_train)} train / {len(p['data'].y_test)} "
                  f"test, {n_params} parameters, LDS ground truth {p['lds'].n_subsets} "
                  f"subsets" + (f", LOO {len(p['loo'].indices)} removals" if p["loo"]
                                else ""), flush=True)
            loo_col = p["loo"] is not None
            print("| peer | method | LDS peer | LDS skdattri | "
                  + ("LOO peer | LOO skdattri | " if loo_col else "")
                  + "agree | fit s peer | attr. s peer | fit s skdattri | attr. s skdattri | "
                  "peer/skdattri time | MB peer | MB skdattri | settings |")
            print("|" + "---|" * (15 if loo_col else 13), flush=True)
            sk_done = {}
            for lib, method, _, sk_key, note in rows_for(p):
                if lib not in args.peers or (args.methods and method not in args.methods):
                    continue
                r = spawn(path, lib, method, tmp)
                if sk_key not in sk_done:
                    sk_done[sk_key] = spawn(path, "skdattri", sk_key, tmp)
                s = sk_done[sk_key]
                metrics = {}
                for side, res in (("peer", r), ("sk", s)):
                    if "error" in res:
                        continue
                    res["S"] = res.get("S", np.load(res["scores"]))
                    finite = np.all(np.isfinite(res["S"]))
                    metrics[side] = (
                        lds_score(p["lds"], res["S"]) if finite else float("nan"),
                        loo_score(p["loo"], res["S"]) if finite and loo_col else None)
                agree = (agreement(r["S"], s["S"]) if "peer" in metrics and "sk" in metrics
                         else None)
                if "error" in r:
                    note = f"**{lib} failed: {r['error']}**; " + note
                if "error" in s:
                    note = f"**skdattri failed: {s['error']}**; " + note
                lp, ls = metrics.get("peer", (None, None)), metrics.get("sk", (None, None))
                tp = r["fit"] + r["attribute"] if "fit" in r else None
                ts = s["fit"] + s["attribute"] if "fit" in s else None
                cells = [lib, method, _fmt(lp[0], ".3f"), _fmt(ls[0], ".3f")]
                if loo_col:
                    cells += [_fmt(lp[1], ".3f"), _fmt(ls[1], ".3f")]
                cells += [_fmt(agree, ".2f"), _fmt(r.get("fit"), ".2f"),
                          _fmt(r.get("attribute"), ".2f"), _fmt(s.get("fit"), ".2f"),
                          _fmt(s.get("attribute"), ".2f"),
                          _fmt(tp / ts if tp and ts else None, ".2f"),
                          _fmt(r.get("peak_mb"), ".0f"), _fmt(s.get("peak_mb"), ".0f"), note]
                print("| " + " | ".join(cells) + " |", flush=True)
    print(f"\n# total {time.perf_counter() - t_start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
