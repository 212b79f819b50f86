"""Peak memory of one ORT session, measured in a fresh process so nothing else is counted.

    python -m onnxopt.measure.memprobe MODEL FEEDS.npz EP THREADS  ->  prints peak MB

The child imports onnxruntime, records its resident memory, creates the session and runs it once,
then prints the growth of its peak resident memory (VmHWM) over that baseline: weights, arenas
and ORT's pre-packed copies, without the Python interpreter and the library code.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np

__all__ = ["session_peak_mb"]


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise OSError(f"no {field} in /proc/self/status")


def session_peak_mb(model: str, feeds: Mapping[str, np.ndarray], ep: str, threads: int,
                    workdir: str) -> float | None:
    """None where /proc is missing (not Linux) or the child fails."""
    feeds_path = Path(workdir) / "feeds.npz"
    np.savez(feeds_path, **feeds)
    child = subprocess.run(
        [sys.executable, "-m", "onnxopt.measure.memprobe", model, str(feeds_path), ep, str(threads)],
        capture_output=True, text=True, timeout=600,
    )
    try:
        return float(child.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def _main(model: str, feeds_path: str, ep: str, threads: str) -> None:
    from onnxopt.measure import runtime

    runtime.onnxruntime()
    baseline = _status_mb("VmRSS")
    session = runtime.make_session(model, ep=ep, threads=int(threads))
    with np.load(feeds_path) as data:
        runtime.run(session, {k: data[k] for k in data.files})
    print(f"{_status_mb('VmHWM') - baseline:.1f}")


if __name__ == "__main__":
    _main(*sys.argv[1:5])
