"""The BAM agent (RATS attester): profile each target, monitor it, attest, enforce.

One concept per module: :mod:`config` (settings: TOML + ``BAM_AGENT_*``), :mod:`spool`
(SQLite queue of observations + the evidence hash chain, crash-safe), :mod:`stream` (live
sensor batches → per-thread window scores), :mod:`monitor` (one target: profiling, monitoring,
observations), :mod:`delivery` (challenge → sign → send, in order, with retry),
:mod:`runner` (the daemon loop tying them together and applying actions).
"""
