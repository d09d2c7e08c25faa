"""The attestation server (RATS verifier and relying-party side): ``bam server``.

Agents enrol with one-time tokens and pinned keys, fetch single-use nonces, and post signed EAT
evidence; the server verifies each token completely (through :mod:`bam.evidence`) before it stores
anything, appraises it with a Rego policy, and answers with an EAR result signed by its own key,
carrying the action (allow, monitor, isolate, terminate, investigate) for the agent to execute.

The server keeps no state in process memory that matters for correctness: nonces, chain state,
results, rate-limit counters and policies live in the database, so any number of replicas can
run over one PostgreSQL (or several workers over one SQLite file).

Modules: :mod:`.settings` (configuration), :mod:`.db` (schema, engine, migrations),
:mod:`.service` (the appraisal pipeline, HTTP-free), :mod:`.policy` (Rego), :mod:`.ear`
(signed results), :mod:`.app` (FastAPI), :mod:`.routes` (one module per resource),
:mod:`.dashboard` (HTML), :mod:`.metrics`, :mod:`.ratelimit`, :mod:`.tls`, :mod:`.bench`.
"""
