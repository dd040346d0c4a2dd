"""What the benchmark scripts print about the machine (not part of the package)."""

import platform
import subprocess


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
