"""Safe persistence of models: JSON metadata + numpy arrays in one ``.npz``; never pickle.

Loading a model must not execute code, so files are read with ``allow_pickle=False`` and only
numeric arrays are accepted. Each artefact's ``model_id`` is the sha256 of its canonical content
(metadata JSON with sorted keys, then every array's name, dtype, shape and bytes in name order).
The id is recorded in the file and recomputed on load: a file whose content was altered is
refused, and ``expect_model_id`` pins a known-good artefact (evidence carries the id, so the
verifier can appraise which detector produced a verdict).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bam.errors import ModelError, ModelIntegrityError

FORMAT = "bam-model"
SCHEMA = 1
_META_KEY = "__bam_meta__"
_MAX_FILE = 2 * 1024**3
_ALLOWED_KINDS = "biufc"  # bool, int, uint, float, complex: never object arrays


def _canonical_json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def compute_model_id(meta: Mapping[str, Any], arrays: Mapping[str, npt.NDArray[Any]]) -> str:
    """sha256 over the canonical metadata and arrays (independent of file layout/compression)."""
    h = hashlib.sha256()
    h.update(_canonical_json(dict(meta)))
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode() + b"\0" + a.dtype.str.encode() + b"\0")
        h.update(repr(a.shape).encode() + b"\0")
        h.update(a.tobytes())
    return "sha256:" + h.hexdigest()


def save_artifact(
    path: str | Path, kind: str, meta: Mapping[str, Any], arrays: Mapping[str, npt.NDArray[Any]]
) -> str:
    """Write ``meta`` + ``arrays`` to ``path`` atomically; return the ``model_id``."""
    for name, a in arrays.items():
        if name.startswith("__") or np.asarray(a).dtype.kind not in _ALLOWED_KINDS:
            raise ValueError(f"array {name!r} cannot be saved (reserved name or non-numeric dtype)")
    body = {"format": FORMAT, "schema": SCHEMA, "kind": kind, "meta": dict(meta)}
    model_id = compute_model_id(body, arrays)
    header = dict(body, model_id=model_id)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            payload: dict[str, Any] = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
            payload[_META_KEY] = np.frombuffer(_canonical_json(header), dtype=np.uint8)
            np.savez_compressed(f, **payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return model_id


def load_artifact(
    path: str | Path, kind: str | None = None, expect_model_id: str | None = None
) -> tuple[dict[str, Any], dict[str, npt.NDArray[Any]], str]:
    """Read and verify an artefact; return ``(meta, arrays, model_id)``.

    Raises :class:`ModelError` for unreadable or foreign files and :class:`ModelIntegrityError`
    when the content does not match its recorded id or ``expect_model_id``.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as e:
        raise ModelError(f"{p}: cannot read model: {e.strerror or e}") from None
    if size > _MAX_FILE:
        raise ModelError(f"{p}: model file is {size} bytes, over the {_MAX_FILE} limit")
    try:
        with np.load(p, allow_pickle=False) as z:
            if _META_KEY not in z.files:
                raise ModelError(f"{p}: not a BAM model (no {_META_KEY} entry)")
            raw_header = z[_META_KEY].tobytes()
            arrays = {k: z[k] for k in z.files if k != _META_KEY}
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(f"{p}: not a readable BAM model file ({type(e).__name__}: {e})") from None
    try:
        header = json.loads(raw_header)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{p}: model metadata is not valid JSON: {e}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ModelError(f"{p}: not a BAM model (format tag missing or wrong)")
    if header.get("schema") != SCHEMA:
        raise ModelError(
            f"{p}: model schema {header.get('schema')!r} is not supported (this BAM reads {SCHEMA})"
        )
    if kind is not None and header.get("kind") != kind:
        raise ModelError(f"{p}: model is a {header.get('kind')!r}, expected a {kind!r}")
    for name, a in arrays.items():
        if a.dtype.kind not in _ALLOWED_KINDS:
            raise ModelError(f"{p}: array {name!r} has a non-numeric dtype {a.dtype}")
    recorded = str(header.pop("model_id", ""))
    actual = compute_model_id(header, arrays)
    if not _eq(recorded, actual):
        raise ModelIntegrityError(
            f"{p}: model content does not match its recorded model_id (file altered?): "
            f"recorded {recorded or 'none'}, content {actual}"
        )
    if expect_model_id is not None and not _eq(expect_model_id, actual):
        raise ModelIntegrityError(f"{p}: model_id {actual} is not the expected {expect_model_id}")
    return dict(header["meta"]), arrays, actual


def _eq(a: str, b: str) -> bool:
    import hmac

    return hmac.compare_digest(a.encode(), b.encode())
