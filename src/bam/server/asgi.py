"""Entry point for uvicorn workers: ``uvicorn --factory bam.server.asgi:app_factory``.

Each worker builds its app from the environment (``BAM_*``) and the TOML file, the same way,
so several workers (or replicas) agree on everything without talking to each other.
"""

from __future__ import annotations

from fastapi import FastAPI

from bam.server.app import create_app
from bam.server.settings import ServerSettings


def app_factory() -> FastAPI:
    return create_app(ServerSettings())
