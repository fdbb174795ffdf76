"""Mozilla "intermediate" compliance of the HTTPS listener, checked by sslyze itself.

Runs when an ``sslyze`` command is on PATH or in ``$SSLYZE`` (it pins its own cryptography
and pydantic versions, so it lives in a virtualenv of its own, not in the project's).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from https_harness import Harness, running_gateway

from gatewayd.certs import issue_server_cert, new_server_ca, save_pair

SSLYZE = os.environ.get("SSLYZE") or shutil.which("sslyze")
pytestmark = pytest.mark.skipif(SSLYZE is None, reason="sslyze is not installed")


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Harness]:
    # A server certificate as gatewayd's own tooling makes it, but within Mozilla's 366-day
    # lifetime limit, from a CA that sslyze is told to trust.
    pki = tmp_path / "pki"
    pki.mkdir()
    ca = new_server_ca(("127.0.0.0/8", "localhost"))
    save_pair(ca, pki, "server-ca")
    server = save_pair(issue_server_cert(ca, ["127.0.0.1", "localhost"],
                                         valid_for=timedelta(days=90)), pki, "server")
    https = {"cert_file": str(server.cert), "key_file": str(server.key)}
    async for harness in running_gateway(tmp_path / "gw", https=https):
        yield harness


async def test_the_listener_is_mozilla_intermediate_compliant(gw: Harness, tmp_path: Path
                                                              ) -> None:
    assert SSLYZE is not None
    ca_file = tmp_path / "pki" / "server-ca.crt"
    process = await asyncio.create_subprocess_exec(
        SSLYZE, "--mozilla_config=intermediate", f"--certinfo_ca_file={ca_file}", gw.host,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 300)
    text = output.decode(errors="replace")
    assert process.returncode == 0, text
    assert "FAILED - Not compliant" not in text and "OK - Compliant" in text, text
