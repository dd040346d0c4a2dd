"""``.npz`` files that are either complete or absent, and read back with one clear error.

Both the retrain cache and saved ground truths go through here:

- :func:`write_npz` writes to a temporary file in the destination's folder, flushes it
  to disk and renames it over the destination (:func:`os.replace` is atomic), so a
  process killed mid-write leaves the previous file -- or none -- never a truncated one;
- :func:`write_model` / :func:`read_model` do the same for a retrained model (a skorch
  net's state dict, or a joblib file of any other estimator), the models that
  ``python -m skdattri retrain --save-models`` keeps;
- :func:`read_npz` reads every entry at once (``allow_pickle=False``) and turns whatever
  a truncated, overwritten or foreign file raises into a ``ValueError`` naming the file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np

__all__ = ["DamagedFileError", "read_model", "read_npz", "write_model", "write_npz"]

#: Prefix of the temporary files of :func:`write_npz` (never read as entries).
TEMP_PREFIX = ".tmp-"


class DamagedFileError(ValueError):
    """A file that is not a complete ``.npz`` archive of plain arrays.

    ``path`` and ``reason`` (what reading it reported) are attributes.
    """

    def __init__(self, path, reason):
        self.path, self.reason = os.fspath(path), reason
        super().__init__(f"{self.path} is damaged or truncated ({reason}).")


@contextlib.contextmanager
def _atomic(path):
    """A temporary file next to ``path``, renamed over it when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TEMP_PREFIX + path.name,
                               suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_model(path, model):
    """Save a fitted model atomically: a skorch net's ``module_`` state dict (tensors on
    the CPU) with :func:`torch.save`, any other estimator with :func:`joblib.dump`.

    Either form is what the ``checkpoints`` parameter of the attributors accepts
    (state dicts of the same architecture, or fitted estimators).

    Examples
    --------
    >>> import os, tempfile
    >>> from sklearn.linear_model import LinearRegression
    >>> from skdattri.ground_truth._store import read_model, write_model
    >>> path = os.path.join(tempfile.mkdtemp(), "m.joblib")
    >>> write_model(path, LinearRegression().fit([[0.0], [1.0]], [0.0, 2.0]))
    >>> read_model(path).coef_
    array([2.])
    """
    import joblib
    import torch

    module = getattr(model, "module_", None)
    with _atomic(path) as f:
        if isinstance(module, torch.nn.Module):
            torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, f)
        else:
            joblib.dump(model, f)


def read_model(path):
    """A model written by :func:`write_model`: a state dict (``.pt``) or an estimator.

    Files other than ``.pt`` are unpickled by :func:`joblib.load`: only load files you
    trust.
    """
    import joblib
    import torch

    if Path(path).suffix == ".pt":
        return torch.load(path, map_location="cpu", weights_only=True)
    return joblib.load(path)


def write_npz(path, entries):
    """Write ``entries`` (name -> array) to ``path`` atomically.

    Parameters
    ----------
    path : str or path-like
        Destination; its folder is created when missing.

    entries : dict of str to array-like
        Saved with :func:`numpy.savez` (no pickled objects).

    Returns
    -------
    path : Path

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> from skdattri.ground_truth._store import read_npz, write_npz
    >>> path = write_npz(os.path.join(tempfile.mkdtemp(), "x.npz"), {"a": np.arange(3)})
    >>> read_npz(path)["a"]
    array([0, 1, 2])
    >>> _ = path.write_bytes(path.read_bytes()[:30])
    >>> read_npz(path)
    Traceback (most recent call last):
    ...
    skdattri.ground_truth._store.DamagedFileError: ...x.npz is damaged or truncated (...).
    """
    path = Path(path)
    with _atomic(path) as f:
        np.savez(f, **entries)
    return path


def read_npz(path):
    """Every entry of an ``.npz`` file, or a ``ValueError`` naming a damaged file.

    Parameters
    ----------
    path : str or path-like

    Returns
    -------
    entries : dict of str to ndarray

    Raises
    ------
    FileNotFoundError
        When there is no such file.
    DamagedFileError
        A ``ValueError``, when the file is not a complete ``.npz`` archive of plain
        arrays (truncated, overwritten, or holding pickled objects).
    """
    try:
        # our own file object: numpy leaks the one it opens when the archive is damaged
        with open(path, "rb") as file:
            data = np.load(file, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ValueError("it holds a single array, not an .npz archive")
            with data:
                return {name: data[name] for name in data.files}
    except FileNotFoundError:
        raise
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "allow_pickle" in reason:
            reason = "it is not an .npz archive of plain arrays"
        raise DamagedFileError(path, reason) from exc
