"""``python -m skdattri retrain``: sharded retraining, resume, saved models, merge."""

import json

import numpy as np
import pytest

from skdattri.cli import main
from skdattri.datasets import load_setting
from skdattri.estimator_checks import assert_scores_close
from skdattri.ground_truth import (
    LDSGroundTruth,
    LOOGroundTruth,
    _retrain,
    lds_ground_truth,
    load_ground_truth,
    load_retrained_models,
    loo_ground_truth,
)
from skdattri.ground_truth._partition import parse_partition, shard_groups
from skdattri.ground_truth._targets import query_targets

# a half of 60 digits can lack a class: the query targets then warn (and take p = 0)
pytestmark = pytest.mark.filterwarnings("ignore:.*not seen by a retrained model:UserWarning")

N_TRAIN, N_TEST, N_SUBSETS = 60, 10, 6
BASE = ["retrain", "digits-lr", "--n-train", str(N_TRAIN), "--n-test", str(N_TEST),
        "--n-jobs", "1", "--quiet"]
LDS = [*BASE, "--n-subsets", str(N_SUBSETS)]


@pytest.fixture(scope="module")
def setting():
    return load_setting("digits-lr", n_train=N_TRAIN, n_test=N_TEST, random_state=0)


@pytest.fixture(scope="module")
def expected_lds(setting):
    s = setting
    return lds_ground_truth(s.estimator, s.X_train, s.y_train, s.X_test, s.y_test,
                            n_subsets=N_SUBSETS, subset_fraction=0.5, random_state=0)


class _Fits:
    """Counts the retrains fitted in this process; ``fail_at=n`` interrupts the n-th."""

    def __init__(self, monkeypatch):
        self.n, self.fail_at = 0, None
        original = _retrain.fit_clone_and_apply

        def counted(*args, **kwargs):
            self.n += 1
            if self.n == self.fail_at:
                raise KeyboardInterrupt
            return original(*args, **kwargs)

        monkeypatch.setattr(_retrain, "fit_clone_and_apply", counted)


@pytest.fixture
def fits(monkeypatch):
    return _Fits(monkeypatch)


def _run(argv):
    assert main([str(a) for a in argv]) == 0


def _error(argv, capsys):
    """The one-line error of a command that must exit with status 2."""
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m skdattri retrain")
    return err


def _assert_same_ground_truth(got, expected):
    assert type(got) is type(expected)
    np.testing.assert_array_equal(got.values, expected.values)
    if isinstance(got, LDSGroundTruth):
        np.testing.assert_array_equal(got.masks, expected.masks)
    else:
        np.testing.assert_array_equal(got.indices, expected.indices)
        assert got.n_train == expected.n_train
    assert got.target == expected.target


def test_partition_parsing_and_shards_cover_the_work_once():
    assert parse_partition("2/5") == (2, 5) and parse_partition("1/1") == (1, 1)
    for bad in ["2", "0/3", "4/3", "a/b", "1/0", "1/2/3"]:
        with pytest.raises(ValueError, match="--partition"):
            parse_partition(bad)
    for n, k in [(6, 3), (7, 3), (5, 5), (100, 7)]:
        parts = [shard_groups(n, i, k) for i in range(1, k + 1)]
        np.testing.assert_array_equal(np.concatenate(parts), np.arange(n))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_three_shards_merged_equal_one_unpartitioned_run(tmp_path, fits, capsys,
                                                         expected_lds):
    out = tmp_path / "run"
    for i in (1, 2, 3):
        _run([*LDS, "--partition", f"{i}/3", "--out", out])
    assert fits.n == N_SUBSETS  # every subset fitted exactly once over the shards
    printed = capsys.readouterr().out
    assert "shard 3/3 of digits-lr: 2 retrains (2 fitted, 0 from cache)" in printed
    _run(["retrain", "merge", out])
    gt = load_ground_truth(out / "ground-truth-lds.npz")
    _assert_same_ground_truth(gt, expected_lds)
    assert gt.provenance == expected_lds.provenance  # same keys, seeds, fingerprints
    assert fits.n == N_SUBSETS  # merging fits nothing

    # a rerun with --resume refits nothing and merges to the same values
    for i in (1, 2, 3):
        _run([*LDS, "--partition", f"{i}/3", "--out", out, "--resume"])
    assert fits.n == N_SUBSETS
    assert "(0 fitted, 2 from cache)" in capsys.readouterr().out
    _run(["retrain", "merge", out])
    np.testing.assert_array_equal(
        load_ground_truth(out / "ground-truth-lds.npz").values, expected_lds.values)


def test_interrupted_shard_resumes_only_the_unfinished_work(tmp_path, fits, capsys,
                                                            expected_lds):
    out = tmp_path / "run"
    fits.fail_at = 2  # Ctrl-C during the second retrain of shard 1/2 (3 retrains)
    with pytest.raises(KeyboardInterrupt):
        main([*LDS, "--partition", "1/2", "--out", str(out)])
    assert fits.n == 2 and not (out / "shards" / "lds-1-of-2.npz").exists()
    fits.fail_at = None
    err = _error([*LDS, "--partition", "1/2", "--out", out], capsys)  # no --resume
    assert "already has 1 finished retrains; pass --resume" in err
    assert fits.n == 2
    _run([*LDS, "--partition", "1/2", "--out", out, "--resume"])
    assert fits.n == 2 + 2  # only the two unfinished retrains
    assert "(2 fitted, 1 from cache)" in capsys.readouterr().out
    _run([*LDS, "--partition", "2/2", "--out", out, "--merge"])
    assert fits.n == 4 + 3
    _assert_same_ground_truth(load_ground_truth(out / "ground-truth-lds.npz"), expected_lds)


def test_loo_shards_merge_to_loo_ground_truth(tmp_path, fits, setting):
    out = tmp_path / "loo"
    argv = [*BASE, "--kind", "loo", "--n-loo", "4", "--out", out]
    for i in (1, 2):
        _run([*argv, "--partition", f"{i}/2"])
    assert fits.n == 1 + 4  # the full model and one model per removal
    _run(["retrain", "merge", out, "--kind", "loo"])
    spec = json.loads((out / "retrain-loo.json").read_text())
    s = setting
    expected = loo_ground_truth(s.estimator, s.X_train, s.y_train, s.X_test, s.y_test,
                                indices=spec["indices"], random_state=0)
    got = load_ground_truth(out / "ground-truth-loo.npz")
    assert isinstance(got, LOOGroundTruth) and got.n_removed == 4
    _assert_same_ground_truth(got, expected)


def test_saved_models_reproduce_the_ground_truth(tmp_path, fits, setting, expected_lds):
    out = tmp_path / "run"
    _run([*LDS, "--out", out, "--save-models", "--merge"])
    models = load_retrained_models(out)
    assert len(models) == N_SUBSETS
    for model, mask, row in zip(models, expected_lds.masks, expected_lds.values):
        assert model.coef_.shape[1] == 64
        np.testing.assert_array_equal(query_targets(model, setting.X_test, setting.y_test,
                                                    "loss"), row)
        # the saved model was fitted on its subset: refitting there gives the same weights
        refit = type(model)(**model.get_params()).fit(setting.X_train[mask],
                                                      setting.y_train[mask])
        assert_scores_close(refit.coef_, model.coef_, ulps=4096)
    # a lost model file is refitted on --resume (and only that one)
    next((out / "models").glob("lds-00002-*")).unlink()
    with pytest.raises(ValueError, match="1 of 6 lds models are missing"):
        load_retrained_models(out)
    n = fits.n
    _run([*LDS, "--out", out, "--save-models", "--resume"])
    assert fits.n == n + 1 and len(load_retrained_models(out)) == N_SUBSETS


def test_net_models_are_saved_as_state_dicts(tmp_path, fits):
    import torch

    out = tmp_path / "mlp"
    _run(["retrain", "digits-mlp", "--n-train", "40", "--n-test", "5", "--n-subsets", "2",
          "--n-jobs", "1", "--quiet", "--out", out, "--save-models", "--merge"])
    states = load_retrained_models(out)
    assert len(states) == 2 and sorted(states[0]) == sorted(
        f"fc{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias"))
    assert all(isinstance(v, torch.Tensor) for v in states[0].values())
    assert not torch.equal(states[0]["fc1.weight"], states[1]["fc1.weight"])


def test_dask_scheduler_gives_the_same_ground_truth(tmp_path, expected_lds):
    distributed = pytest.importorskip("distributed")
    out = tmp_path / "dask"
    with distributed.LocalCluster(n_workers=1, processes=False, threads_per_worker=2,
                                  dashboard_address=None) as cluster:
        _run([*LDS, "--out", out, "--scheduler", cluster.scheduler_address, "--merge"])
    _assert_same_ground_truth(load_ground_truth(out / "ground-truth-lds.npz"), expected_lds)


@pytest.mark.parametrize("extra, message", [
    (["--partition", "3", "--out", "D"], "expected I/K"),
    (["--partition", "0/3", "--out", "D"], "need 1 <= I <= K"),
    (["--partition", "4/3", "--out", "D"], "need 1 <= I <= K"),
    (["--partition", "7/7", "--out", "D"], "7 shards for 6 retrains"),
    (["--partition", "1/2"], "needs --out DIR"),
    (["--n-subsets", "1", "--out", "D"], "--n-subsets must be at least 2"),
    (["--n-jobs", "0", "--out", "D"], "--n-jobs must be a non-zero"),
    (["--subset-fraction", "0", "--out", "D"], "--subset-fraction must lie in (0, 1)"),
    (["--n-loo", "99", "--kind", "loo", "--out", "D"], "exceeds the 60 training"),
])
def test_bad_arguments_exit_2_before_training(tmp_path, fits, capsys, monkeypatch, extra,
                                              message):
    monkeypatch.chdir(tmp_path)
    err = _error([*LDS, *extra], capsys)
    assert message in err
    assert fits.n == 0


def test_bad_setting_run_mismatch_and_missing_shards(tmp_path, fits, capsys):
    assert "Unknown setting 'digits-xx'" in _error(
        ["retrain", "digits-xx", "--out", tmp_path / "x"], capsys)
    assert "has no LOO ground truth by default" in _error(
        ["retrain", "digits-mlp", "--kind", "loo", "--out", tmp_path / "x"], capsys)
    out = tmp_path / "run"
    _run([*LDS, "--partition", "2/3", "--out", out])
    n = fits.n
    err = _error([*BASE, "--n-subsets", "9", "--partition", "1/3", "--out", out], capsys)
    assert "holds another lds run (n_subsets=6 there, 9 here)" in err
    assert "lacks shards 1/3, 3/3" in _error(["retrain", "merge", out], capsys)
    assert "holds no retrain run" in _error(["retrain", "merge", tmp_path / "x"], capsys)
    assert "needs the DIR" in _error(["retrain", "merge"], capsys)
    assert fits.n == n


def test_mnist10_settings_are_listed(capsys):
    assert main(["benchmark", "--list"]) == 0
    out = capsys.readouterr().out.split("methods:")[0].split()
    for name in ["mnist10-lr", "mnist10-lr-noisy", "mnist10-mlp", "mnist10-mlp-noisy"]:
        assert name in out
