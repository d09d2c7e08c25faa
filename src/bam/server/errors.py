"""The server's error type: an HTTP status, a stable reason code and a human message.

Every failure the API reports is one of these (or is turned into one), so clients always get
``{"reason": ..., "message": ...}`` and never a stack trace.
"""

from __future__ import annotations

from bam.errors import BamError


class ServerError(BamError):
    """A request or operation failed; ``reason`` is machine-readable, ``message`` for people."""

    def __init__(
        self, status: int, reason: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        self.status = status
        self.reason = reason
        self.message = message
        self.headers = headers or {}
        super().__init__(f"{reason}: {message}")


class ChainDivergedError(ServerError):
    """A verified token that does not extend the agent's chain (``seq_replay``,
    ``chain_broken``): no token can change that until an operator resets the chain, so the
    server remembers it on the agent (``agent_id``) for operators to see."""

    def __init__(self, error: ServerError, agent_id: str) -> None:
        super().__init__(error.status, error.reason, error.message, error.headers)
        self.agent_id = agent_id


class PolicyError(ServerError):
    """A policy did not compile, or did not evaluate to a valid decision."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(422, reason, message)
