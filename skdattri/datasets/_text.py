"""An English character corpus built from text installed with Python and scikit-learn."""

import functools
import re
import unicodedata
from pathlib import Path

import numpy as np

#: Token alphabet of the ``text-gpt`` setting: newline followed by printable ASCII.
VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))


def _clean(text):
    """ASCII-fold, collapse whitespace inside lines, drop lines without letters or digits."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    lines = (" ".join(line.split()) for line in text.splitlines())
    return "\n".join(line for line in lines if re.search(r"[A-Za-z0-9]", line)) + "\n"


@functools.lru_cache(maxsize=1)
def _corpus():
    """Return the cleaned corpus string and a description of its sources.

    The sources are the dataset descriptions shipped in ``sklearn/datasets/descr/*.rst``
    (sorted by file name) followed by the help topics of the standard library's
    ``pydoc_data.topics`` (sorted by topic), when that module is present.
    """
    import sklearn.datasets

    descr = Path(sklearn.datasets.__file__).parent / "descr"
    parts = [_clean(p.read_text(encoding="utf-8")) for p in sorted(descr.glob("*.rst"))]
    sources = [f"{len(parts)} scikit-learn dataset descriptions"]
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some minimal Python builds strip pydoc_data
        pass
    else:
        parts += [_clean(topics[key]) for key in sorted(topics)]
        sources.append(f"{len(topics)} pydoc_data help topics")
    return "".join(parts), " and ".join(sources)


def _encode(text):
    """Map characters to indices into ``VOCAB`` (the corpus only holds VOCAB characters)."""
    codes = np.frombuffer(text.encode("ascii"), dtype=np.uint8).astype(np.int64)
    # newline -> 0, printable ASCII c -> c - 31
    return np.where(codes == 10, 0, codes - 31)


def decode(tokens):
    """Turn a sequence of ``text-gpt`` token indices back into a string.

    Parameters
    ----------
    tokens : array-like of int
        Indices into ``VOCAB``.

    Returns
    -------
    text : str

    Examples
    --------
    >>> from skdattri.datasets import decode
    >>> decode([41, 70, 0])
    'He\\n'
    """
    return "".join(VOCAB[int(t)] for t in np.ravel(tokens))


def _text_windows(block_size):
    """Cut the encoded corpus into non-overlapping windows of ``block_size + 1`` tokens."""
    text, sources = _corpus()
    tokens = _encode(text)
    n_windows = len(tokens) // (block_size + 1)
    windows = tokens[: n_windows * (block_size + 1)].reshape(n_windows, block_size + 1)
    return windows, sources
