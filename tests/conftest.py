"""Shared test helpers.

``BAM_REQUIRE_ALL=1`` (set by ``.ci/run``) turns a missing external tool or data set into a
failure instead of a skip, so CI can never pass by silently skipping the real parts.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
REQUIRE_ALL = os.environ.get("BAM_REQUIRE_ALL") == "1"


def require(ok: bool, what: str) -> None:
    """Skip (or, under ``BAM_REQUIRE_ALL=1``, fail) when a prerequisite is missing."""
    if ok:
        return
    if REQUIRE_ALL:
        pytest.fail(f"required for this test but missing: {what} (BAM_REQUIRE_ALL=1)")
    pytest.skip(f"missing: {what}")


def require_tool(name: str) -> str:
    """Path of executable ``name``, or skip/fail naming it."""
    path = shutil.which(name)
    require(path is not None, f"executable {name!r}")
    assert path is not None
    return path


def adfa_path() -> Path:
    """The shared ADFA-LD copy beside the repository (``../shared/datasets/adfa-ld``)."""
    candidates = [
        Path(os.environ.get("BAM_ADFA_LD", "")) if os.environ.get("BAM_ADFA_LD") else None,
        REPO.parent / "shared" / "datasets" / "adfa-ld",
    ]
    for c in candidates:
        if c is not None and (c / "Training_Data_Master").is_dir():
            return c
    require(False, "ADFA-LD at ../shared/datasets/adfa-ld")
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def adfa_root() -> Path:
    return adfa_path()
