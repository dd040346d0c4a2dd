"""The gradient store: memory and disk agree bit for bit, half precision rounds as its
dtype says, disk files are published atomically and pickle as references, nothing reads
more rows than a block."""

import copy
import gc
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from skdattri._state import _map_state
from skdattri.store import DiskStore, MemoryStore, make_store

ROOT = Path(__file__).resolve().parents[1]
N, D = 23, 6


def _rows(n=N, d=D, dtype=torch.float64, seed=0):
    """Rows whose magnitudes span six decades (1e-3 to 1e3), signs mixed."""
    g = torch.Generator().manual_seed(seed)
    scale = 10.0 ** torch.linspace(-3, 3, n, dtype=torch.float64)[:, None]
    return (torch.randn(n, d, generator=g, dtype=torch.float64) * scale).to(dtype)


def _filled(store, G, chunk=7):
    for start in range(0, len(G), chunk):
        store.write(slice(start, start + chunk), G[start:start + chunk])
    return store.finalize()


def _files(directory):
    return sorted(p.name for p in Path(directory).iterdir())


def _python(code):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300)


# ---------------------------------------------------------------------- agreement
@pytest.mark.parametrize("store_dtype", [None, "float16", "bfloat16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_memory_and_disk_give_identical_results(tmp_path, dtype, store_dtype):
    G = _rows(dtype=dtype)
    Q = _rows(5, seed=1, dtype=dtype)
    kw = {"dtype": dtype, "store_dtype": store_dtype, "block_rows": 4}
    mem = _filled(make_store(N, D, **kw), G, chunk=7)
    disk = _filled(make_store(N, D, store=tmp_path, **kw), G, chunk=5)
    assert isinstance(mem, MemoryStore) and isinstance(disk, DiskStore)
    for sl in (slice(0, N), slice(3, 11), slice(20, None), slice(5, 5)):
        a, b = mem.read(sl), disk.read(sl)
        assert a.dtype == b.dtype == dtype and torch.equal(a, b)
    for (sa, a), (sb, b) in zip(mem.blocks(3), disk.blocks(3), strict=True):
        assert sa == sb and torch.equal(a, b)
    for method, args in (("inner", (Q,)), ("row_dot", ()), ("gram", ())):
        a, b = getattr(mem, method)(*args), getattr(disk, method)(*args)
        assert a.dtype == b.dtype == dtype and torch.equal(a, b), method
    if store_dtype is None:
        assert torch.equal(disk.read(slice(None)), G)


def test_scoring_helpers_match_dense_products():
    G, Q = _rows(), _rows(5, seed=1)
    store = _filled(make_store(N, D, dtype=torch.float64, block_rows=4), G)
    # |fl(a.b) - a.b| <= n eps |a|.|b| for a length-n dot product
    eps = torch.finfo(torch.float64).eps
    bound = D * eps * (Q.abs() @ G.abs().T)
    assert torch.all((store.inner(Q) - Q @ G.T).abs() <= bound)
    assert torch.all((store.row_dot() - (G * G).sum(1)).abs() <= D * eps * (G * G).sum(1))
    double = store.row_dot(lambda b: 2 * b)
    assert torch.all((double - 2 * (G * G).sum(1)).abs() <= 2 * D * eps * (G * G).sum(1))
    gram = store.gram(dtype="float64")
    assert torch.all((gram - G.T @ G).abs() <= N * eps * (G.abs().T @ G.abs()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gram_from_upper_tiles_is_symmetric_over_blocks(monkeypatch, dtype):
    from skdattri import _utils

    monkeypatch.setattr(_utils, "_GRAM_TILE", 4)  # tiles of 4 of the 6 columns
    G = _rows()
    store = _filled(make_store(N, D, dtype=dtype, block_rows=4), G.to(dtype))
    gram = store.gram(dtype="float64")
    assert gram.dtype == torch.float64 and torch.equal(gram, gram.T)
    # products of <= 4 rows in the store's dtype, summed in float64
    eps = torch.finfo(dtype).eps
    Gd = G.to(dtype).double()
    assert torch.all((gram - Gd.T @ Gd).abs() <= 4 * eps * (Gd.abs().T @ Gd.abs()))
    same = store.gram()
    assert same.dtype == dtype and torch.equal(same, same.T)


@pytest.mark.parametrize("store_dtype", [torch.float16, "bfloat16"])
@pytest.mark.parametrize("where", ["memory", "disk"])
def test_half_precision_rounds_to_nearest(tmp_path, store_dtype, where):
    G = _rows(dtype=torch.float32)
    store = make_store(N, D, dtype=torch.float32, store_dtype=store_dtype,
                       store=None if where == "memory" else tmp_path)
    _filled(store, G)
    half = store.storage_dtype
    assert half in (torch.float16, torch.bfloat16) and store.nbytes == N * D * 2
    back = store.read(slice(None))
    assert back.dtype == torch.float32
    # round to nearest in the normal range: |x - fl(x)| <= eps/2 |x|
    err = (back - G).abs()
    assert torch.all(err <= torch.finfo(half).eps / 2 * G.abs())
    assert err.max() > 0  # the rows really were kept in half precision
    assert torch.equal(back, G.to(half).to(torch.float32))


# ---------------------------------------------------------------------- disk files
def test_finalize_publishes_the_file_atomically(tmp_path):
    store = make_store(N, D, dtype="float64", store=tmp_path, name="grads")
    store.write(slice(0, 10), _rows()[:10])
    # while writing, only a hidden temporary file exists: nothing looks complete
    before = _files(tmp_path)
    assert len(before) == 1 and before[0].startswith(".grads-") and before[0].endswith(".tmp")
    assert not os.path.exists(store.path) and not os.path.exists(store.sidecar)
    with pytest.raises(ValueError, match="13 of the 23 rows .* never written .* row 10"):
        store.finalize()
    store.write(slice(10, N), _rows()[10:])
    assert store.finalize() is store and store.finalized
    assert _files(tmp_path) == sorted([Path(store.path).name, Path(store.sidecar).name])
    assert os.path.getsize(store.path) == store.nbytes == N * D * 8
    meta = json.loads(Path(store.sidecar).read_text())
    assert meta["shape"] == [N, D] and meta["storage_dtype"] == "float64"
    with pytest.raises(ValueError, match="finalized and read-only"):
        store.write(slice(0, 1), torch.zeros(1, D))
    store.unlink()
    assert _files(tmp_path) == []


def test_an_interrupted_fit_leaves_no_file(tmp_path):
    store = make_store(N, D, dtype="float32", store=tmp_path)
    store.write(slice(0, 5), torch.ones(5, D))
    assert len(_files(tmp_path)) == 1
    del store  # the fit raised: its store is collected
    gc.collect()
    assert _files(tmp_path) == []


def test_disk_rows_are_copied_before_write_returns(tmp_path):
    """Rows are written on a background thread: the caller may reuse its block at once,
    and reads wait for the rows being written."""
    G = _rows()
    store = make_store(N, D, dtype="float64", store=tmp_path)
    block = torch.empty(5, D, dtype=torch.float64)
    for start in range(0, N, 5):
        stop = min(start + 5, N)
        block[: stop - start] = G[start:stop]
        store.write(slice(start, stop), block[: stop - start])
        block.fill_(float("nan"))  # reused at once, as a fit reuses its buffers
    np.testing.assert_array_equal(store.read(slice(0, N)), G)  # before finalize too
    store.finalize()
    np.testing.assert_array_equal(store.read(slice(0, N)), G)
    store.unlink()


def test_a_failed_background_write_is_raised(tmp_path, monkeypatch):
    from skdattri import store as store_module

    def fail(self, offset, staged):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_module._BackgroundWriter, "_write", fail)
    store = make_store(N, D, dtype="float64", store=tmp_path)
    with pytest.raises(OSError, match="No space left"):
        store.write(slice(0, 10), _rows()[:10])  # the error of this write ...
        store.write(slice(10, N), _rows()[10:])  # ... is raised by the next one
    store = make_store(N, D, dtype="float64", store=tmp_path)
    store.write(slice(0, N), _rows())
    with pytest.raises(OSError, match="No space left"):
        store.finalize()  # or by finalize, and nothing is published
    assert not os.path.exists(store.path)


@pytest.mark.skipif(os.name != "posix", reason="dead processes are found with os.kill")
def test_temporary_files_of_dead_processes_are_removed_by_the_next_store(tmp_path):
    done = _python(
        "import os, torch; from skdattri.store import make_store\n"
        f"s = make_store(4, 3, dtype='float32', store={str(tmp_path)!r})\n"
        "s.write(slice(0, 2), torch.ones(2, 3)); os._exit(3)")  # killed: no cleanup ran
    assert done.returncode == 3, done.stderr
    left = _files(tmp_path)
    assert len(left) == 1 and left[0].endswith(".tmp")
    live = make_store(4, 3, dtype="float32", store=tmp_path)  # this process's, alive
    assert _files(tmp_path) == [Path(live._temp).name]
    other = make_store(4, 3, dtype="float32", store=tmp_path)
    assert Path(live._temp).exists() and Path(other._temp).exists()


def test_two_stores_of_one_name_share_a_directory(tmp_path):
    a = _filled(make_store(N, D, dtype="float64", store=tmp_path, name="g"), _rows())
    b = _filled(make_store(N, D, dtype="float64", store=tmp_path, name="g"), _rows(seed=3))
    assert a.path != b.path and len(_files(tmp_path)) == 4
    assert torch.equal(a.read(slice(None)), _rows())
    assert torch.equal(b.read(slice(None)), _rows(seed=3))


def test_missing_truncated_or_foreign_files_raise_a_clear_error(tmp_path):
    store = _filled(make_store(N, D, dtype="float32", store=tmp_path), _rows())
    loaded = pickle.loads(pickle.dumps(store))
    with open(store.path, "r+b") as f:
        f.truncate(store.nbytes - 4)
    with pytest.raises(ValueError, match=r"has 548 bytes.* takes 552.*truncated.*refit"):
        loaded.read(slice(0, 1))
    os.remove(store.path)
    with pytest.raises(ValueError, match=r"is missing.*refit the attributor, or restore"):
        loaded.inner(torch.ones(1, D))
    # a file of the right size that the sidecar says is something else
    other = _filled(make_store(N, D, dtype="float32", store=tmp_path), _rows())
    meta = json.loads(Path(other.sidecar).read_text())
    Path(other.sidecar).write_text(json.dumps({**meta, "shape": [D, N]}))
    with pytest.raises(ValueError, match=r"says shape=\[6, 23\].*not this store's file"):
        pickle.loads(pickle.dumps(other)).read(slice(0, 1))


def test_disk_store_pickles_as_a_reference_and_reloads(tmp_path):
    G = _rows()
    store = _filled(make_store(N, D, dtype="float64", store_dtype="bfloat16",
                               store=tmp_path, device="cpu"), G)
    expected = store.read(slice(None))
    blob = pickle.dumps(store)
    assert len(blob) < 2048  # path, shape and dtypes, not the rows
    del store
    gc.collect()
    loaded = pickle.loads(blob)
    assert loaded.storage_dtype == torch.bfloat16 and loaded.dtype == torch.float64
    assert torch.equal(loaded.read(slice(None)), expected)
    # ... and in another process
    (tmp_path / "store.pkl").write_bytes(blob)
    out = tmp_path / "rows.npy"
    done = _python(
        "import pickle, numpy as np\n"
        f"s = pickle.loads(open({str(tmp_path / 'store.pkl')!r}, 'rb').read())\n"
        f"np.save({str(out)!r}, s.read(slice(None)).numpy())")
    assert done.returncode == 0, done.stderr
    np.testing.assert_array_equal(np.load(out), expected.numpy())


def test_memory_store_pickles_its_rows():
    store = _filled(make_store(N, D, dtype="float32", store_dtype="float16"), _rows())
    loaded = pickle.loads(pickle.dumps(store))
    assert loaded.storage_dtype == torch.float16
    assert torch.equal(loaded.read(slice(None)), store.read(slice(None)))


def test_an_unfinalized_disk_store_refuses_to_be_pickled_or_copied(tmp_path):
    store = make_store(N, D, dtype="float32", store=tmp_path)
    for action in (pickle.dumps, copy.deepcopy, copy.copy):
        with pytest.raises(ValueError, match="before finalize"):
            action(store)


def test_deepcopy_of_a_disk_store_shares_its_file(tmp_path):
    store = _filled(make_store(N, D, dtype="float64", store=tmp_path), _rows())
    files = _files(tmp_path)
    twin = copy.deepcopy({"a": store})["a"]
    assert twin is not store and twin.path == store.path and _files(tmp_path) == files
    assert vars(twin) == vars(store)  # a snapshot of fitted state compares equal
    assert torch.equal(twin.read(slice(None)), store.read(slice(None)))
    mem = _filled(make_store(N, D, dtype="float64"), _rows())
    mem_twin = copy.deepcopy(mem)
    assert mem_twin._data.data_ptr() != mem._data.data_ptr()
    assert torch.equal(mem_twin.read(slice(None)), mem.read(slice(None)))


# ---------------------------------------------------------------------- devices
class _CountingDisk(DiskStore):
    """A disk store that records how many rows each file access moves."""

    def __init__(self, *args, **kwargs):
        self.got, self.put = [], []
        super().__init__(*args, **kwargs)

    def _get(self, start, stop):
        self.got.append(stop - start)
        return super()._get(start, stop)

    def _put(self, start, block):
        self.put.append(block.shape[0])
        super()._put(start, block)


def test_the_device_mover_does_not_load_a_disk_store(tmp_path):
    disk = _filled(_CountingDisk(tmp_path, N, D, dtype="float64"), _rows())
    mem = _filled(make_store(N, D, dtype="float64"), _rows())
    calls = []

    def to_meta(t):
        calls.append(tuple(t.shape))
        return t.to("meta")

    state = {"disk": disk, "mem": mem, "again": [disk, mem]}
    moved = _map_state(state, to_meta, "meta")
    assert calls == [(N, D)]  # the memory store's tensor only
    assert disk.got == []  # not one row of the file was read
    d, m = moved["disk"], moved["mem"]
    assert moved["again"][0] is d and moved["again"][1] is m
    assert type(d) is _CountingDisk and d.path == disk.path and d.device.type == "meta"
    assert m._data.device.type == "meta" and m.device.type == "meta"
    assert d.read(slice(0, 2)).device.type == "meta"
    # the originals are untouched
    assert disk.device.type == mem.device.type == mem._data.device.type == "cpu"
    assert torch.equal(mem.read(slice(None)), _rows())


def test_the_device_mover_lets_stores_move_themselves(tmp_path, monkeypatch):
    seen = []
    for cls in (MemoryStore, DiskStore):
        original = cls._map_device

        def spy(self, fn, device, memo, _original=original):
            seen.append(type(self).__name__)
            return _original(self, fn, device, memo)

        monkeypatch.setattr(cls, "_map_device", spy)
    stores = [_filled(make_store(N, D, dtype="float64", store=where), _rows())
              for where in (None, tmp_path)]
    moved = _map_state({"caches": stores}, lambda t: t.to("meta"), "meta")
    assert seen == ["MemoryStore", "DiskStore"]
    assert [s.device.type for s in moved["caches"]] == ["meta", "meta"]


def test_reads_and_writes_move_at_most_one_block(tmp_path):
    G = _rows(47, D)
    store = _CountingDisk(tmp_path, 47, D, dtype="float64", block_rows=10)
    for start in range(0, 47, 8):
        store.write(slice(start, start + 8), G[start:start + 8])
    assert store.put == [8, 8, 8, 8, 8, 7]
    store.finalize()
    store.got.clear()
    assert store.read(slice(30, 33)).shape == (3, D) and store.got == [3]
    for name, call in (("inner", lambda: store.inner(G[:4])), ("row_dot", store.row_dot),
                       ("gram", store.gram), ("blocks", lambda: list(store.blocks(6)))):
        store.got.clear()
        call()
        size = 6 if name == "blocks" else 10
        assert max(store.got) <= size and sum(store.got) == 47, name


@pytest.mark.gpu
def test_cuda_reads_and_moves(tmp_path):
    G = _rows(dtype=torch.float32)
    disk = _filled(make_store(N, D, dtype="float32", store=tmp_path, device="cuda",
                              store_dtype="bfloat16"), G.cuda())
    mem = _filled(make_store(N, D, dtype="float32", device="cuda", store_dtype="bfloat16"),
                  G.cuda())
    assert disk.read(slice(None)).device.type == "cuda"
    assert torch.equal(disk.inner(G[:3]).cpu(), mem.inner(G[:3].cuda()).cpu())
    cpu = _map_state([disk, mem], lambda t: t.to("cpu"), "cpu")
    assert cpu[0].path == disk.path and cpu[1]._data.device.type == "cpu"
    assert torch.equal(cpu[0].read(slice(None)), cpu[1].read(slice(None)))


# ---------------------------------------------------------------------- arguments
@pytest.mark.parametrize("kwargs, error, match", [
    ({"n_rows": -1}, ValueError, "n_rows must be >= 0, got -1"),
    ({"n_cols": 2.5}, TypeError, "n_cols must be an int, got float"),
    ({"n_rows": True}, TypeError, "n_rows must be an int, got bool"),
    ({"dtype": "int32"}, ValueError, r"dtype='int32' is not supported; use one of"),
    ({"dtype": np.float32}, TypeError, "dtype must be a str or a torch.dtype"),
    ({"store_dtype": "float8"}, ValueError, r"store_dtype='float8' is not supported"),
    ({"store_dtype": torch.int16}, ValueError, r"store_dtype=torch.int16 is not supported"),
    ({"store": 3}, TypeError, "store must be None, 'memory' or a directory path, got int"),
    ({"block_rows": 0}, ValueError, "block_rows must be >= 1, got 0"),
    ({"store": "DIR", "name": "../up"}, ValueError, "name must be letters"),
    ({"device": "tpu"}, ValueError, "device='tpu'"),
])
def test_invalid_arguments_are_named(tmp_path, kwargs, error, match):
    args = {"n_rows": 4, "n_cols": 3, "dtype": "float32", **kwargs}
    if args.get("store") == "DIR":
        args["store"] = tmp_path
    with pytest.raises(error, match=match):
        make_store(args.pop("n_rows"), args.pop("n_cols"), **args)


def test_a_file_is_not_a_store_directory(tmp_path):
    path = tmp_path / "file.bin"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="is a file; give a directory"):
        make_store(4, 3, dtype="float32", store=path)
    store = make_store(4, 3, dtype="float32", store=str(tmp_path / "new" / "dir"))
    assert os.path.isdir(store.directory)


@pytest.mark.parametrize("where", ["memory", "disk"])
def test_invalid_writes_and_queries_are_named(tmp_path, where):
    store = make_store(4, 3, dtype="float32", store_dtype="float16",
                       store=None if where == "memory" else tmp_path)
    with pytest.raises(TypeError, match="rows must be a slice, got int"):
        store.write(0, torch.ones(1, 3))
    with pytest.raises(ValueError, match="step 1"):
        store.write(slice(0, 4, 2), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"block has shape \(2, 3\), but rows=slice\(3, 5"):
        store.write(slice(3, 5), torch.ones(2, 3))
    with pytest.raises(TypeError, match="floating values, got torch.int64"):
        store.write(slice(0, 1), torch.ones(1, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"up to 7e\+04, beyond the range of float16.*bfloat16"):
        store.write(slice(0, 1), torch.full((1, 3), 7e4))
    store.write(slice(0, 4), np.ones((4, 3)))  # numpy blocks are taken too
    with pytest.raises(ValueError, match=r"Q must have shape \(n_query, 3\), got \(2, 4\)"):
        store.finalize().inner(torch.ones(2, 4))
    assert "storage_dtype=float16" in repr(store)


def test_only_finite_values_that_overflow_half_precision_are_refused():
    store = make_store(3, 2, dtype="float32", store_dtype="float16")
    big = torch.finfo(torch.float16).max
    # a little above the largest float16 still rounds to it; inf and NaN stay as given
    store.write(slice(0, 1), torch.tensor([[big + 8.0, -big]]))
    store.write(slice(1, 2), torch.tensor([[float("inf"), float("nan")]]))
    store.write(slice(2, 2), torch.empty(0, 2))
    with pytest.raises(ValueError, match=r"values up to 6\.6e\+04, beyond .* float16"):
        store.write(slice(2, 3), torch.tensor([[float("inf"), 6.6e4]]))
    store.write(slice(2, 3), torch.zeros(1, 2))
    back = store.finalize().read(slice(None))
    assert back[0].tolist() == [big, -big] and back[1, 0] == float("inf")
    assert torch.isnan(back[1, 1])
    # bfloat16 has float32's range: the same values are kept
    wide = make_store(1, 2, dtype="float32", store_dtype="bfloat16")
    wide.write(slice(0, 1), torch.tensor([[6.6e4, 3e38]]))
    assert torch.all(torch.isfinite(wide.finalize().read(slice(None))))
