"""The access gate and workload secrets: released only to a trusted, fresh workload.

``access`` is the relying party's view (latest signed EAR and a plain allow/deny). A secret is
stored AES-256-GCM-encrypted (``keys/secrets.key``, bound to ``workload/name`` as associated
data) and released only to the workload's own agent while ``allow`` holds, re-checked inside
the releasing transaction.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import RowMapping, delete, insert, select

from bam.server import ratelimit
from bam.server.errors import ServerError
from bam.server.service.core import R, S, ServiceCore, W


class SecretsMixin(ServiceCore):
    """Access decisions and secret storage/release."""

    _aead: AESGCM | None = None

    def _freshness(self, wl: RowMapping, now: float) -> bool:
        at = wl["last_result_at"]
        if at is None:
            return False
        limit = min(self.settings.release_max_age_s, wl["interval_s"] * self.settings.stale_factor)
        return bool(now - at <= limit)

    def access(self, name: str) -> dict[str, Any]:
        """Relying-party view: latest signed EAR and a plain allow/deny."""
        now = time.time()
        with self.read() as conn:
            wl = self._workload_row(conn, name)
            res = None
            if wl["last_result_id"] is not None:
                res = (
                    conn.execute(select(R).where(R.c.id == wl["last_result_id"])).mappings().first()
                )
        fresh = self._freshness(wl, now)
        status = res["status"] if res else "none"
        allow = bool(
            res is not None
            and status == "affirming"
            and fresh
            and not wl["stale"]
            and not wl["hold"]
        )
        return {
            "workload": name,
            "allow": allow,
            "status": status,
            "action": res["action"] if res else "allow",
            "fresh": fresh,
            "hold": bool(wl["hold"]),
            "stale": bool(wl["stale"]),
            "reasons": json.loads(res["reasons"]) if res else ["no result yet"],
            "result_id": res["id"] if res else None,
            "result_at": res["created_at"] if res else None,
            "ear": res["ear"] if res else None,
            "server_kid": self.server_key.kid,
        }

    def _cipher(self) -> AESGCM:
        if self._aead is None:
            path = self.settings.key_dir / "secrets.key"
            self._aead = AESGCM(_load_or_create_key(path))
        return self._aead

    def put_secret(self, name: str, secret: str, value: str, actor: str) -> None:
        now = time.time()
        with self.write() as conn:
            wl = self._workload_row(conn, name)
            iv = os.urandom(12)
            blob = iv + self._cipher().encrypt(iv, value.encode(), f"{name}/{secret}".encode())
            conn.execute(delete(S).where(S.c.workload_id == wl["id"], S.c.name == secret))
            conn.execute(
                insert(S).values(workload_id=wl["id"], name=secret, ciphertext=blob, created_at=now)
            )
            self.audit(conn, actor, "secret_stored", name, {"secret": secret}, now)

    def release_secret(self, agent: RowMapping, name: str, secret: str) -> str:
        """The secret, only for the workload's own agent, affirming, fresh, not held or stale.

        Refusals are audited in their own transaction (the refusal itself rolls nothing back).
        """
        now = time.time()
        actor = f"agent:{agent['id']}"
        with self.read() as conn:
            wl = self._workload_row(conn, name)
        if wl["agent_id"] != agent["id"]:
            raise ServerError(403, "forbidden", f"workload {name!r} belongs to another agent")
        access = self.access(name)
        if not access["allow"]:
            why = (
                "stale"
                if access["stale"]
                else "held"
                if access["hold"]
                else "not fresh"
                if not access["fresh"]
                else access["status"]
            )
            with self.write() as conn:
                ratelimit.hit(conn, agent["id"], self.settings.agent_requests_per_minute, now)
                self.audit(conn, actor, "secret_denied", name, {"secret": secret, "why": why}, now)
            raise ServerError(
                403, "not_trusted", f"workload {name!r} is not affirming and fresh ({why})"
            )
        with self.write() as conn:
            ratelimit.hit(conn, agent["id"], self.settings.agent_requests_per_minute, now)
            # The decision above was on a snapshot: release only if nothing moved since.
            cur = conn.execute(
                select(W.c.hold, W.c.stale, W.c.last_result_id).where(W.c.id == wl["id"])
            ).first()
            if cur is None or cur.hold or cur.stale or cur.last_result_id != access["result_id"]:
                raise ServerError(409, "state_changed", "the workload's state changed; retry")
            blob = conn.execute(
                select(S.c.ciphertext).where(S.c.workload_id == wl["id"], S.c.name == secret)
            ).scalar()
            if blob is None:
                raise ServerError(404, "secret_unknown", f"no secret {secret!r} for {name!r}")
            value = self._cipher().decrypt(blob[:12], blob[12:], f"{name}/{secret}".encode())
            self.audit(
                conn,
                actor,
                "secret_released",
                name,
                {"secret": secret, "result_id": access["result_id"]},
                now,
            )
        return value.decode()


def _load_or_create_key(path: Path) -> bytes:
    """A 256-bit key file (0600 in a 0700 directory), created atomically on first use.

    Written to a temporary file and hard-linked into place, so a concurrent reader never sees
    a partial key and two creators agree on one (the loser reads the winner's).
    """
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, AESGCM.generate_key(bit_length=256))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    data = path.read_bytes()
    if len(data) != 32:
        raise ServerError(500, "secret_key_invalid", f"{path} is not a 32-byte key")
    return data
