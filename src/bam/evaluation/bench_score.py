"""``bam bench score``: events per second scored by each detector on ADFA-LD, one core.

BLAS is limited to one thread so the figure is per core. Both CPU time (what the scorer costs,
robust to other load on a shared machine) and wall time are reported; fitting is not timed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from threadpoolctl import threadpool_limits

from bam.detect.baseline import SET_SUFFIX, make_baseline
from bam.evaluation.adfa import DEFAULT_DETECTORS, EVAL_WINDOW
from bam.traces.adfa import AdfaDataset

# The detectors themselves: a ``+set`` baseline scores with the same detector (its set term
# shows in ``baseline_events_per_s`` when asked for by name).
SCORED = tuple(d for d in DEFAULT_DETECTORS if not d.endswith(SET_SUFFIX))


def bench_score(
    data: AdfaDataset,
    detectors: Sequence[str] = SCORED,
    repeat: int = 3,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Best-of-``repeat`` scoring rate of each detector over Validation + Attack."""
    seqs = [s for t in data.validation + data.attack for s in t.sequences()]
    n_events = int(sum(len(s) for s in seqs))
    out: dict[str, Any] = {"events": n_events, "sequences": len(seqs), "detectors": {}}
    with threadpool_limits(1):
        for name in detectors:
            if progress:
                progress(name)
            base = make_baseline(name, window=EVAL_WINDOW).fit(data.training)
            det = base.detector
            best_cpu = best_wall = float("inf")
            for _ in range(repeat):
                c0, w0 = time.process_time(), time.perf_counter()
                det.score(seqs)
                best_cpu = min(best_cpu, time.process_time() - c0)
                best_wall = min(best_wall, time.perf_counter() - w0)
            c0 = time.process_time()
            base.trace_scores([t.sequences() for t in data.validation + data.attack])
            base_cpu = time.process_time() - c0
            out["detectors"][name] = {
                "model": det.name,
                "events_per_s": round(n_events / max(best_cpu, 1e-9)),
                "events_per_s_wall": round(n_events / max(best_wall, 1e-9)),
                "baseline_events_per_s": round(n_events / max(base_cpu, 1e-9)),
                "cpu_s": round(best_cpu, 3),
                "wall_s": round(best_wall, 3),
            }
    return out
