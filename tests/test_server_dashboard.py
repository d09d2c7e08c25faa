"""The dashboard in a real headless Chromium (Playwright driving /usr/bin/chromium).

A server process gets a workload with a contraindicated result; the browser logs in with a
viewer token, sees the workload flagged in the fleet table, opens its page and finds the
anomaly-score timeline plot (inline SVG, one point per evidence).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from bam.evidence import EvidenceBuilder, SoftwareSigner
from bam.server.client import AgentClient
from bam.server.harness import ServerProcess
from bam.server.service import Service
from bam.server.settings import ServerSettings
from conftest import require
from evidence_support import make_behavior, make_measurements

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, str, str]]:
    root = tmp_path_factory.mktemp("dash")
    env = {"BAM_SERVER_DIR": str(root / "server"), "BAM_LOG_LEVEL": "warning"}
    svc = Service(ServerSettings(server_dir=root / "server"))
    viewer = svc.create_operator_token("viewer", "viewer", "test")
    enrol, _ = svc.create_enrol_token("test")
    svc.close()
    with ServerProcess(env, log_path=root / "server.log") as srv:
        signer = SoftwareSigner.generate()
        with AgentClient(srv.url, signer) as agent:
            agent.enrol(enrol, "dash-agent")
            agent.register_workload("web-frontend", "container", 30)
            builder = EvidenceBuilder(signer)
            nonce = agent.challenge()
            for severity in ("none", "low", "none", "medium", "critical"):
                out = agent.submit(
                    builder.build(
                        nonce, make_measurements("web-frontend"), make_behavior(severity)
                    ).token
                )
                nonce = out["next_challenge"]["nonce"]
        assert out["result"]["status"] == "contraindicated"
        yield srv, viewer, "web-frontend"


def test_dashboard_shows_contraindicated_workload_and_timeline(
    seeded: tuple[ServerProcess, str, str],
) -> None:
    require(
        Path(CHROMIUM).exists() or shutil.which("chromium") is not None,
        "chromium (apt install chromium)",
    )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require(False, "the playwright Python package")
        raise
    srv, viewer, workload = seeded
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-background-networking",
                "--disable-sync",
                "--disable-component-update",
                "--disable-default-apps",
                "--no-first-run",
            ],
        )
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{srv.url}/dashboard")
            assert page.url.endswith("/dashboard/login")  # not logged in: sent to the login page
            page.fill("#token", viewer)
            page.click("#login")
            page.wait_for_url(f"{srv.url}/dashboard")
            row = page.locator(f'tr.workload-row[data-workload="{workload}"]')
            row.wait_for()
            assert row.get_attribute("data-status") == "contraindicated"
            assert "held" in row.inner_text()

            row.locator("a").click()
            page.wait_for_url(f"**/dashboard/workloads/{workload}")
            assert page.locator("#workload-status").inner_text() == "contraindicated"
            plot = page.locator("svg#timeline")
            plot.wait_for()
            assert plot.locator("circle.point").count() == 5
            assert plot.locator("circle.sev-critical").count() == 1
            assert plot.locator("polyline.series").count() == 1
            assert "behavior_severity_critical" in page.locator("#results").inner_text()
            assert "isolate" in page.locator("#actions").inner_text()

            # Live refresh replaces the fragment in place (no reload; CSP forbids eval).
            page.locator("#live[data-updated]").wait_for(timeout=15000)
            assert page.locator("svg#timeline").count() == 1
            assert not errors, errors
        finally:
            browser.close()
