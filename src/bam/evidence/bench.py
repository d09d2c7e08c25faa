"""``bam bench evidence``: how fast tokens are built, signed and verified, and quotes made.

Software key: each round builds and signs the next token of a chain (24 file measurements, BAM's
code digest and a behaviour summary: the token of a typical service), then verifies it
completely (signature, nonce, freshness, chain against the previous one). TPM: quotes per
second on a swtpm this function starts (or on ``tcti`` if given).
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bam.evidence.claims import BehaviorCounts, BehaviorSummary, Target
from bam.evidence.errors import TpmError
from bam.evidence.keys.base import VerificationKey
from bam.evidence.keys.software import SoftwareSigner
from bam.evidence.measure import collect_measurements, measure_process
from bam.evidence.nonces import new_nonce
from bam.evidence.token import EvidenceBuilder
from bam.evidence.verify import VerifiedEvidence, verify_token


def _behavior() -> BehaviorSummary:
    return BehaviorSummary(
        window_start=1_700_000_000.0,
        window_end=1_700_000_010.0,
        baseline_id="0" * 64,
        scores={"ngram": 0.12, "hmm": 3.4, "gmm": 0.8},
        thresholds={"ngram": 0.3, "hmm": 9.1, "gmm": 2.0},
        severity="none",
        label="normal",
        probability=0.97,
        top_features=["openat->read", "read->close", "mmap->mprotect"],
        counts=BehaviorCounts(new_processes=0, new_listening_ports=0, exec_mappings=0),
        raw_log_sha256="1" * 64,
    )


def bench_tokens(n: int = 1000, files: int = 24) -> dict[str, Any]:
    """Median build+sign and verify times (ms) and round trips per second, software key.

    The token is that of a typical service process: ``files`` measured files (real ones: this
    process's executable and mapped libraries, so the size does not depend on what happens to
    be loaded), BAM's own code digest and a behaviour summary.

    Each round also times one bare Ed25519 verification (``ed25519_verify_ms_median``): the
    floor under any token verification and a yardstick for the CPU — on a shared or throttled
    machine it stretches with everything else. As in :mod:`timeit`, the garbage collector is
    paused while timing.
    """
    signer = SoftwareSigner.generate()
    vk = VerificationKey.from_signer(signer)
    proc = measure_process(os.getpid())
    measurements = collect_measurements(
        Target(kind="process", name=proc.name, pid=proc.pid), files=proc.files[:files]
    )
    behavior = _behavior()
    builder = EvidenceBuilder(signer)
    nonces = [new_nonce() for _ in range(n)]
    ref_key = Ed25519PrivateKey.generate()
    ref_public, ref_message = ref_key.public_key(), b"\0" * 32
    ref_signature = ref_key.sign(ref_message)
    sign_s: list[float] = []
    verify_s: list[float] = []
    ref_s: list[float] = []
    previous: VerifiedEvidence | None = None
    size = 0
    clock = time.perf_counter
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = clock()
        for nonce in nonces:
            t0 = clock()
            ev = builder.build(nonce, measurements, behavior)
            t1 = clock()
            previous = verify_token(ev.token, vk, nonce=nonce, previous=previous)
            t2 = clock()
            ref_public.verify(ref_signature, ref_message)
            t3 = clock()
            sign_s.append(t1 - t0)
            verify_s.append(t2 - t1)
            ref_s.append(t3 - t2)
            size = len(ev.token)
        total = clock() - start - sum(ref_s)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {
        "sign_ms_median": round(statistics.median(sign_s) * 1e3, 4),
        "verify_ms_median": round(statistics.median(verify_s) * 1e3, 4),
        "tokens_per_s": round(n / total, 1),
        "tokens": n,
        "token_bytes": size,
        "measured_files": len(measurements.files),
        "ed25519_verify_ms_median": round(statistics.median(ref_s) * 1e3, 4),
    }


def bench_quotes(quotes: int = 50, tcti: str | None = None) -> dict[str, Any]:
    """Quotes per second (8 PCRs, AK loaded once), on ``tcti`` or a fresh swtpm."""
    from bam.evidence.swtpm import Swtpm
    from bam.evidence.tpm import TpmDevice

    emulator = None
    if tcti is None:
        emulator = Swtpm().start()
        tcti = emulator.tcti
    try:
        with TpmDevice(tcti) as dev:
            dev.quote(b"\0" * 32)  # create the AK outside the timing
            times: list[float] = []
            for i in range(quotes):
                t0 = time.perf_counter()
                dev.quote(i.to_bytes(32, "big"))
                times.append(time.perf_counter() - t0)
    finally:
        if emulator is not None:
            emulator.close()
    return {
        "tpm_quotes_per_s": round(quotes / sum(times), 1),
        "tpm_quote_ms_median": round(statistics.median(times) * 1e3, 3),
        "tpm_tcti": "swtpm (started by the benchmark)" if emulator is not None else tcti,
    }


def bench_evidence(
    n: int = 1000, quotes: int = 50, tcti: str | None = None, tpm: bool = True, files: int = 24
) -> dict[str, Any]:
    """The ``bam bench evidence`` result; ``tpm_quotes_per_s`` is ``None`` without a TPM."""
    out = bench_tokens(n, files)
    out.update({"tpm_quotes_per_s": None, "tpm_quote_ms_median": None, "tpm_error": None})
    if tpm and quotes > 0:
        try:
            out.update(bench_quotes(quotes, tcti))
        except TpmError as e:
            out["tpm_error"] = str(e)
    return out
