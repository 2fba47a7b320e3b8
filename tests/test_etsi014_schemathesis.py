"""schemathesis against a live ETSI 014 server (real mutual TLS on loopback): 0 failures of any check.

The server is site A's KME (linked in process to site B), serving on uvicorn with its own
``/openapi.json``, which declares the limits the server enforces. schemathesis (its CLI, in a child
process, as an operator would run it) loads that description over mTLS with SAE_A's client certificate
and runs every check (``--checks all``) over the examples, coverage and fuzzing phases, with a
bounded number of examples per operation.

The path parameters are pinned to the SAE IDs this deployment registers (``SAE_B``): a generated SAE
ID is unknown to the KME, and ETSI GS QKD 014 V1.1.1 answers an unknown SAE with 400/401, so a
"valid" random ID would be refused correctly. Two exceptions, each one check on the operations
named, are written into the configuration below with the clause of the standard that requires the
server's answer.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import sys
from pathlib import Path

import pytest

from _kms_support import PKI, StoreFactory
from qkdstack.kms.etsi014 import serve_etsi014
from qkdstack.kms.kme import KME, KMEConfig, link_pair

pytestmark = pytest.mark.slow

ST = Path(sys.executable).with_name("st")
MAX_EXAMPLES = int(os.environ.get("QKDSTACK_SCHEMATHESIS_EXAMPLES", "40"))

CONFIG = """
tls-verify = "{ca}"
request-cert = "{cert}"
request-cert-key = "{key}"
request-timeout = 10
seed = 1
suppress-health-check = ["too_slow", "filter_too_much"]

[generation]
database = "none"

[parameters]
# The SAE IDs of this deployment (see the module docstring).
slave_SAE_ID = "SAE_B"
master_SAE_ID = "SAE_B"

[[operations]]
include-path-regex = "/dec_keys$"
# ETSI GS QKD 014 V1.1.1, section 5.4 (Get key with key IDs): a key ID the KME does not hold (every
# schema-valid UUID schemathesis draws) is answered 400 "Bad request format" with the Error body, so a
# valid-looking request legitimately gets 400.
checks.positive_data_acceptance.expected-statuses = ["200", "400"]

[[operations]]
include-method = "POST"
include-path-regex = "/enc_keys$"
# ETSI GS QKD 014 V1.1.1, section 5.3 (Get key): additional_slave_SAE_IDs naming SAEs that are not
# slaves of this link (any drawn string) are a bad request, 400.
checks.positive_data_acceptance.expected-statuses = ["200", "400"]
"""


async def _start_kmes(factory: StoreFactory) -> tuple[KME, KME]:
    # Per-request limits small enough that the store, filled below, outlasts any run: at most 8 keys of
    # at most 1024 bits per request (the OpenAPI description declares exactly these bounds).
    limits = {"key_size": 256, "max_key_per_request": 8, "max_key_size": 1024, "max_SAE_ID_count": 2}
    a = KME(KMEConfig("KME_A", "KME_B", frozenset({"SAE_A"}), **limits), factory("a", chunk_bits=256))
    b = KME(KMEConfig("KME_B", "KME_A", frozenset({"SAE_B", "SAE_C"}), **limits), factory("b", chunk_bits=256))
    link_ab, link_ba = link_pair(a, b)
    await a.attach_peer(link_ab)
    await b.attach_peer(link_ba)
    for i in range(40):  # 40 x 64 KiB at each site: 2.5 MiB of key, about 2,500 worst-case requests
        block = secrets.token_bytes(64 * 1024)
        await a.add_block(f"round-{i}", block)
        await b.add_block(f"round-{i}", block)
    return a, b


@pytest.mark.timeout(180)
async def test_schemathesis_finds_nothing(tmp_path):
    assert ST.exists(), "schemathesis is a test dependency (pyproject [test] extra)"
    pki = PKI(tmp_path / "pki")
    factory = StoreFactory("sqlite", tmp_path)
    a, b = await _start_kmes(factory)
    cert, key, _ = pki.files["SAE_A"]
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG.format(ca=pki.root / "ca_A.pem", cert=cert, key=key))
    try:
        async with serve_etsi014(a, "127.0.0.1", 0, pki.tls("A")) as srv:
            proc = await asyncio.create_subprocess_exec(
                str(ST), "--config-file", str(config), "--no-color", "run", f"{srv.url}/openapi.json",
                "--checks", "all", "--max-examples", str(MAX_EXAMPLES), "--workers", "1",
                "--phases", "examples,coverage,fuzzing", "--report", "junit",
                "--report-junit-path", str(tmp_path / "junit.xml"),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=tmp_path,
            )
            try:
                async with asyncio.timeout(150):
                    out, _ = await proc.communicate()
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
    finally:
        await a.close()
        await b.close()
        factory.close_all()
    text = out.decode(errors="replace")
    print(text)
    assert proc.returncode == 0, text[-6000:]
    counts = re.search(r"(\d+) generated, (\d+) passed", text)
    assert counts and counts[1] == counts[2] and int(counts[1]) >= 100, text[-3000:]
    assert re.search(r"Tested: 5\b", text), text[-3000:]
