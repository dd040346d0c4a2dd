"""Helpers the comparison scripts share (not part of the package)."""

import platform
import subprocess

import numpy as np


def cpu_name():
    """The CPU's model name from ``lscpu`` (``platform.processor()`` without it)."""
    name = platform.processor() or "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                name = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return name


def agreement(a, b):
    """Mean over queries of the Pearson correlation of two (n_test, n_train) matrices."""
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    ok = den > 0
    return float(np.mean((a * b).sum(1)[ok] / den[ok])) if ok.any() else float("nan")
