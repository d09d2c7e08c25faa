"""Fit a target's baseline in a child process: ``python -m bam.agent.fit PROFILE OUT [opts]``.

Why a child: fitting allocates several times the profile's size in short-lived numpy arrays
and Python objects, and CPython's allocator keeps much of that heap after the fit (measured:
+35 MB resident for a 1M-call profile, never returned). The agent is a long-running daemon
held to a memory budget, so it writes the profile to a file (its own data directory, mode
0600), lets a short-lived child fit and save the baseline (JSON + npz, sha256 ``model_id``),
and loads the result. The child trusts nothing but its arguments and the file it is given;
the parent verifies the saved model's digest when it loads it.

The profile file is an ``.npz`` of ``ts`` (float64), ``pid``/``tid``/``sid`` (int32) in
time order and ``cuts``: the start index of each time slice (the baseline's traces).
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt

from bam.errors import BamError
from bam.events import SyscallBatch, Trace


def write_profile(path: Path, batch: SyscallBatch, slices: int) -> None:
    """Write ``batch`` (any order) as a time-ordered profile cut into ``slices`` slices."""
    order = np.argsort(batch.ts, kind="stable")
    # the starts of np.array_split's parts (the first n % k parts one longer), empty ones dropped
    n, k = len(order), max(1, min(slices, len(order)))
    cuts = np.arange(k) * (n // k) + np.minimum(np.arange(k), n % k)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp.npz")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        np.savez(
            f,
            ts=batch.ts[order],
            pid=batch.pid[order],
            tid=batch.tid[order],
            sid=batch.sid[order],
            cuts=cuts.astype(np.int64),
        )
    os.replace(tmp, path)


def read_profile(path: Path) -> list[Trace]:
    """The profile's time slices as traces."""
    with np.load(path, allow_pickle=False) as z:
        ts: npt.NDArray[np.float64] = z["ts"]
        pid, tid, sid, cuts = z["pid"], z["tid"], z["sid"], z["cuts"]
    bounds = [*cuts.tolist(), len(ts)]
    return [
        Trace(
            f"profile-{i}",
            SyscallBatch(ts=ts[a:b], pid=pid[a:b], tid=tid[a:b], sid=sid[a:b]),
        )
        for i, (a, b) in enumerate(itertools.pairwise(bounds))
        if b > a
    ]


def fit_in_child(
    profile: Path,
    out: Path,
    *,
    model: str,
    window: int,
    target_far: float,
    holdout: float,
    timeout_s: float = 600.0,
    while_waiting: Callable[[], object] | None = None,
) -> None:
    """Run the fit in a child process; raise :class:`BamError` with its message on failure.

    ``while_waiting`` is called every 20 ms until the child ends: the agent keeps draining its
    sensor meanwhile, or a busy workload would overflow the ring during a fit of seconds."""
    cmd = [
        sys.executable,
        "-m",
        "bam.agent.fit",
        str(profile),
        str(out),
        "--model",
        model,
        "--window",
        str(window),
        "--target-far",
        repr(target_far),
        "--holdout",
        repr(holdout),
    ]
    with tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True)
        deadline = time.monotonic() + timeout_s
        try:
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    raise BamError(f"fitting the baseline took longer than {timeout_s:.0f} s")
                if while_waiting is not None:
                    while_waiting()
                time.sleep(0.02)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if proc.returncode != 0:
            err.seek(0)
            msg = (err.read().strip().splitlines() or ["(no message)"])[-1]
            raise BamError(f"fitting the baseline failed: {msg}")


def main(argv: list[str] | None = None) -> int:
    from bam.detect.baseline import Baseline
    from bam.models import make_detector

    ap = argparse.ArgumentParser(prog="python -m bam.agent.fit", description=__doc__)
    ap.add_argument("profile", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--model", default="lm")
    ap.add_argument("--window", type=int, required=True)
    ap.add_argument("--target-far", type=float, required=True)
    ap.add_argument("--holdout", type=float, required=True)
    a = ap.parse_args(argv)
    try:
        traces = read_profile(a.profile)
        b = Baseline(
            make_detector(a.model), window=a.window, target_far=a.target_far, holdout=a.holdout
        )
        b.fit(traces)
        b.save(a.out)
    except (BamError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
