"""A small synchronous client of the server API, for agents, tests and the benchmark.

It signs agent requests (``BAM-Signature``) with the agent's :class:`~bam.evidence.keys.Signer`
and turns error bodies into :class:`ApiError` (status, reason, message).
"""

from __future__ import annotations

import json
import ssl
import time
from typing import Any

import httpx

from bam.errors import BamError
from bam.evidence.canonical import b64url_encode
from bam.evidence.keys.base import Signer
from bam.server.auth import SIGNATURE_HEADER, enrol_message, sign_request


class ApiError(BamError):
    """The server answered with an error body."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        self.status = status
        self.reason = reason
        self.message = message
        super().__init__(f"HTTP {status} {reason}: {message}")


def tls_verify(verify: bool | str) -> bool | ssl.SSLContext:
    """``True``/``False``, or the path of a CA file to pin (e.g. the one ``bam server init`` made)."""
    if isinstance(verify, str):
        return ssl.create_default_context(cafile=verify)
    return verify


def _check(resp: httpx.Response) -> Any:
    if resp.status_code >= 400:
        try:
            body = resp.json()
            reason, message = str(body["reason"]), str(body["message"])
        except (ValueError, KeyError, TypeError):
            reason, message = f"http_{resp.status_code}", resp.text[:200]
        raise ApiError(resp.status_code, reason, message)
    if resp.status_code == 204 or not resp.content:
        return None
    return resp.json()


class AgentClient:
    """Agent side of the API: enrol, register workloads, challenges, evidence, actions."""

    def __init__(
        self,
        base_url: str,
        signer: Signer,
        *,
        verify: bool | str = True,
        timeout: float = 10.0,
        client: httpx.Client | None = None,
    ) -> None:
        self.signer = signer
        self.http = client or httpx.Client(
            base_url=base_url, verify=tls_verify(verify), timeout=timeout
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _signed(self, method: str, path: str, payload: Any = None) -> Any:
        body = b"" if payload is None else json.dumps(payload).encode()
        header = sign_request(self.signer, method, path, body, int(time.time()))
        headers = {SIGNATURE_HEADER: header}
        if payload is not None:
            headers["content-type"] = "application/json"
        return _check(self.http.request(method, path, content=body, headers=headers))

    def enrol(self, token: str, name: str, ak: dict[str, str] | None = None) -> dict[str, Any]:
        proof = b64url_encode(self.signer.sign(enrol_message(token, self.signer.thumbprint())))
        payload = {
            "token": token,
            "name": name,
            "key": self.signer.public_jwk(),
            "ak": ak,
            "proof": proof,
        }
        result: dict[str, Any] = _check(self.http.post("/v1/enrol", json=payload))
        return result

    def register_workload(
        self, name: str, kind: str = "process", interval_s: float = 30.0
    ) -> dict[str, Any]:
        out: dict[str, Any] = self._signed(
            "POST", "/v1/workloads", {"name": name, "kind": kind, "interval_s": interval_s}
        )
        return out

    def challenge(self) -> str:
        return str(self._signed("POST", "/v1/challenge")["nonce"])

    def challenges(self, count: int) -> list[str]:
        """``count`` nonces at once, one per token of a batch."""
        return [str(n) for n in self._signed("POST", f"/v1/challenge?count={count}")["nonces"]]

    def submit(self, token: str) -> dict[str, Any]:
        """POST one evidence token (authenticated by its own signature)."""
        out: dict[str, Any] = _check(self.http.post("/v1/evidence", json={"token": token}))
        return out

    def submit_batch(self, tokens: list[str]) -> list[dict[str, Any]]:
        """POST several tokens of this agent's chain, in order; one item per token."""
        out = _check(self.http.post("/v1/evidence/batch", json={"tokens": tokens}))
        items: list[dict[str, Any]] = out["items"]
        return items

    def actions(self, after: int = 0, wait: float = 0.0) -> list[dict[str, Any]]:
        out = self._signed("GET", f"/v1/actions?after={after}&wait={wait:g}")
        return list(out["actions"])

    def report(self, action_id: int, state: str, outcome: str = "") -> None:
        self._signed(
            "POST", f"/v1/actions/{action_id}/report", {"state": state, "outcome": outcome}
        )

    def release_secret(self, workload: str, secret: str) -> str:
        out = self._signed("POST", f"/v1/workloads/{workload}/secrets/{secret}/release")
        return str(out["value"])


class OperatorClient:
    """Operator side: bearer-token requests."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        verify: bool | str = True,
        timeout: float = 10.0,
    ) -> None:
        self.http = httpx.Client(
            base_url=base_url,
            verify=tls_verify(verify),
            timeout=timeout,
            headers={"authorization": f"Bearer {token}"},
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> OperatorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get(self, path: str, **params: Any) -> Any:
        return _check(self.http.get(path, params=params or None))

    def post(self, path: str, payload: Any = None) -> Any:
        return _check(self.http.post(path, json=payload if payload is not None else {}))

    def put(self, path: str, payload: Any) -> Any:
        return _check(self.http.put(path, json=payload))

    def put_content(self, path: str, content: bytes | str) -> Any:
        """PUT a JSON document as it is (e.g. a STIX bundle), not re-serialised."""
        headers = {"content-type": "application/json"}
        return _check(self.http.put(path, content=content, headers=headers))

    def delete(self, path: str) -> Any:
        return _check(self.http.delete(path))
