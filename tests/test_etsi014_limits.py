"""ETSI 014 server: request size limits and errors inside the contract, over real mutual TLS.

Oversized request lines, URLs, headers and bodies get 400 with the Error body, from both uvicorn
HTTP implementations (httptools, the default, and the h11 fallback); the body is never buffered (the
server answers while the client is still sending); 405 carries ``Allow``; ``/openapi.json`` lists
what the server sends and the limits it enforces.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from asyncio.subprocess import PIPE

import httpx
import pytest

from _kms_support import PKI, Sites, StoreFactory
from qkdstack.kms.etsi014 import MAX_BODY_BYTES, MAX_HEADER_BYTES, MAX_URL_BYTES, MTLSH11Protocol, serve_etsi014

BASE = "/api/v1/keys/SAE_B"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return PKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture(params=["httptools", "h11"])
async def server(request, tmp_path, pki):
    """Site A's ETSI 014 server (httptools or h11), with site B linked in process."""
    factory = StoreFactory("sqlite", tmp_path)
    sites = await Sites(factory).start(pki)
    try:
        if request.param == "httptools":
            yield sites, sites.srv_a
        else:
            async with serve_etsi014(sites.a, "127.0.0.1", 0, pki.tls("A"), http_protocol=MTLSH11Protocol) as srv:
                yield sites, srv
    finally:
        await sites.stop()
        factory.close_all()


async def _connect(pki, srv):
    return await asyncio.open_connection(
        srv.host, srv.port, ssl=pki.client_context("SAE_A", "A"), server_hostname="127.0.0.1"
    )


async def _read_response(reader: asyncio.StreamReader, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    async with asyncio.timeout(timeout):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers["content-length"]))
    return status, headers, body


def _assert_error(status: int, headers: dict[str, str], body: bytes, message: str) -> dict:
    assert status == 400, body
    assert headers["content-type"] == "application/json"
    doc = json.loads(body)
    assert doc["message"] == message and isinstance(doc["details"], list)
    return doc


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, OSError):
        await writer.wait_closed()


async def _send_and_read(pki, srv, data: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await _connect(pki, srv)
    try:
        writer.write(data)
        await writer.drain()
        return await _read_response(reader)
    finally:
        await _close(writer)


async def test_megabyte_request_line_gets_json_400(server, pki):
    _sites, srv = server
    line = b"GET " + BASE.encode() + b"/enc_keys?number=1&pad=" + b"A" * (1 << 20) + b" HTTP/1.1\r\n"
    status, headers, body = await _send_and_read(pki, srv, line + b"host: kme\r\n\r\n")
    doc = _assert_error(status, headers, body, "request URL too long")
    assert doc["details"] == [{"max_url_bytes": MAX_URL_BYTES}]


async def test_url_limit_is_8_kib(server, pki):
    _sites, srv = server
    async with httpx.AsyncClient(base_url=srv.url, verify=pki.client_context("SAE_A", "A"), timeout=10) as c:
        path = f"{BASE}/enc_keys?number=1&pad="
        ok = await c.get(path + "x" * (MAX_URL_BYTES - len(path)))  # exactly at the limit: served
        assert ok.status_code == 200, ok.text
        assert (await c.get(path + "x" * (MAX_URL_BYTES + 1 - len(path)))).status_code == 400
    # 64 KB (httpx itself refuses URLs this long: raw bytes)
    request = f"GET {path}{'x' * 65536} HTTP/1.1\r\nhost: kme\r\n\r\n".encode()
    _assert_error(*await _send_and_read(pki, srv, request), "request URL too long")


@pytest.mark.parametrize("shape", ["one big field", "many fields"])
async def test_100_kb_of_headers_get_json_400(server, pki, shape):
    _sites, srv = server
    if shape == "one big field":
        fields = b"x-big: " + b"v" * 100_000 + b"\r\n"
    else:
        fields = b"".join(b"x-f%d: %s\r\n" % (i, b"v" * 500) for i in range(200))
    request = b"GET " + BASE.encode() + b"/status HTTP/1.1\r\nhost: kme\r\n" + fields + b"\r\n"
    status, headers, body = await _send_and_read(pki, srv, request)
    doc = _assert_error(status, headers, body, "request headers too large")
    assert doc["details"] == [{"max_header_bytes": MAX_HEADER_BYTES}]


async def test_headers_below_the_limit_are_served(server, pki):
    _sites, srv = server
    async with httpx.AsyncClient(base_url=srv.url, verify=pki.client_context("SAE_A", "A"), timeout=10) as c:
        r = await c.get(f"{BASE}/status", headers={"x-pad": "v" * (MAX_HEADER_BYTES // 2)})
        assert r.status_code == 200, r.text


async def _answer_while_sending(pki, srv, head: bytes, chunks, stop_after: int) -> tuple[tuple, int]:
    """Send ``head`` and then body ``chunks`` while watching for an answer; returns (answer, bytes sent).

    Stops sending after ``stop_after`` body bytes (far less than the declared body): if an answer
    still comes, the server answered without the rest of the body.
    """
    reader, writer = await _connect(pki, srv)
    try:
        writer.write(head)
        answer = asyncio.ensure_future(_read_response(reader, timeout=10))
        sent = 0
        for chunk in chunks:
            if answer.done() or sent >= stop_after:
                break
            writer.write(chunk)
            sent += len(chunk)
            try:
                async with asyncio.timeout(0.5):
                    await writer.drain()
            except (TimeoutError, ConnectionError):
                break  # the server stopped reading (it should not) or closed
            await asyncio.sleep(0)
        return await answer, sent
    finally:
        await _close(writer)


async def test_10_mb_body_is_refused_before_it_is_sent(server, pki):
    """Content-Length of 10 MB: the 400 comes after the head alone, the body is never read."""
    _sites, srv = server
    total = 10 * 1024 * 1024
    head = (
        f"POST {BASE}/enc_keys HTTP/1.1\r\nhost: kme\r\ncontent-type: application/json\r\n"
        f"content-length: {total}\r\n\r\n"
    ).encode()
    chunks = (b" " * 16384 for _ in range(total // 16384))
    (status, headers, body), sent = await _answer_while_sending(pki, srv, head, chunks, stop_after=256 * 1024)
    doc = _assert_error(status, headers, body, "request body too large")
    assert doc["details"] == [{"max_body_bytes": MAX_BODY_BYTES}]
    assert sent <= 256 * 1024 < total


async def test_oversized_second_request_on_a_kept_alive_connection(server, pki):
    """The refusal is answered also after earlier requests on the same connection were served."""
    _sites, srv = server
    reader, writer = await _connect(pki, srv)
    try:
        writer.write(f"GET {BASE}/status HTTP/1.1\r\nhost: kme\r\n\r\n".encode())
        status, _headers, _body = await _read_response(reader)
        assert status == 200
        oversized = f"POST {BASE}/enc_keys HTTP/1.1\r\nhost: kme\r\ncontent-length: {10 << 20}\r\n\r\n"
        writer.write(oversized.encode() + b" " * 4096)
        _assert_error(*await _read_response(reader), "request body too large")
    finally:
        await _close(writer)


async def test_chunked_body_is_refused_at_the_limit_not_buffered(server, pki):
    """No Content-Length (chunked): the server counts what arrives and answers once past 64 KiB."""
    _sites, srv = server
    head = (
        f"POST {BASE}/enc_keys HTTP/1.1\r\nhost: kme\r\ncontent-type: application/json\r\n"
        "transfer-encoding: chunked\r\n\r\n"
    ).encode()
    piece = b" " * 8192
    chunks = (b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(1280))  # 10 MB if all were sent
    (status, headers, body), sent = await _answer_while_sending(pki, srv, head, chunks, stop_after=1 << 20)
    _assert_error(status, headers, body, "request body too large")
    assert sent < 1 << 20  # answered long before the client stopped on its own


async def test_body_limit_lets_ordinary_bodies_through(server, pki):
    _sites, srv = server
    async with httpx.AsyncClient(base_url=srv.url, verify=pki.client_context("SAE_A", "A"), timeout=10) as c:
        padded = json.dumps({"number": 1, "extension_optional": [{"pad": "x" * (MAX_BODY_BYTES - 200)}]})
        assert len(padded) <= MAX_BODY_BYTES
        r = await c.post(f"{BASE}/enc_keys", content=padded, headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text


def _rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


_UPLOAD_CLIENT = """
import json, ssl, sys, httpx
url, cert, key, ca = sys.argv[1:]
ctx = ssl.create_default_context(cafile=ca)
ctx.load_cert_chain(cert, key)
r = httpx.post(url, content=b" " * (10 * 1024 * 1024), headers={"content-type": "application/json"}, verify=ctx,
               timeout=30)
print(json.dumps({"status": r.status_code, "type": r.headers.get("content-type"), "body": r.json()}))
"""


async def test_full_10_mb_upload_gets_json_400_and_memory_does_not_grow(server, pki):
    """A client (another process) that sends the whole 10 MB before reading still gets the 400 (lingering
    close), and the server process (this one) never holds the body: its resident memory, sampled
    throughout, stays flat."""
    _sites, srv = server
    cert, key, _ = pki.files["SAE_A"]
    args = [f"{srv.url}{BASE}/enc_keys", cert, key, str(pki.root / "ca_A.pem")]
    peak = base = _rss_bytes()
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", _UPLOAD_CLIENT, *args, stdout=PIPE, stderr=PIPE)
    try:
        communicate = asyncio.ensure_future(proc.communicate())
        while not communicate.done():
            peak = max(peak, _rss_bytes())
            await asyncio.sleep(0.002)
        out, err = await communicate
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    answer = json.loads(out)
    assert answer["status"] == 400 and answer["type"] == "application/json"
    assert answer["body"]["message"] == "request body too large"
    print(f"RSS growth {(peak - base) / 1e6:.2f} MB")
    assert peak - base < 5 * 1024 * 1024, (peak - base) / 1e6  # half the body; measured 0.5-2 MB


async def test_garbage_request_gets_json_400(server, pki):
    _sites, srv = server
    status, headers, body = await _send_and_read(pki, srv, b"\x00\x01 not http at all\r\n\r\n")
    _assert_error(status, headers, body, "invalid HTTP request")


async def test_405_lists_allowed_methods(server, pki):
    _sites, srv = server
    async with httpx.AsyncClient(base_url=srv.url, verify=pki.client_context("SAE_A", "A"), timeout=10) as c:
        for method, path, allow in (
            ("DELETE", f"{BASE}/enc_keys", "GET, POST"),
            ("PUT", f"{BASE}/status", "GET"),
            ("OPTIONS", "/api/v1/keys/SAE_A/dec_keys", "GET, POST"),
            ("HEAD", f"{BASE}/enc_keys", "GET, POST"),  # HEAD would take keys and drop them: refused
        ):
            r = await c.request(method, path)
            assert r.status_code == 405, (method, path)
            assert r.headers["allow"] == allow
            if method != "HEAD":
                assert r.headers["content-type"] == "application/json" and r.json()["message"]


async def test_strict_bodies_and_bounded_sae_ids(server, pki):
    sites, srv = server
    async with httpx.AsyncClient(base_url=srv.url, verify=pki.client_context("SAE_A", "A"), timeout=10) as c:
        for body in ({"number": "2"}, {"size": True}, {"additional_slave_SAE_IDs": [7]}):
            r = await c.post(f"{BASE}/enc_keys", json=body)
            assert r.status_code == 400, (body, r.text)
        r = await c.post("/api/v1/keys/SAE_B/dec_keys", json={"key_IDs": [{"key_ID": 12}]})
        assert r.status_code == 400
        long_id = "S" * 65
        for path in (f"/api/v1/keys/{long_id}/enc_keys", f"/api/v1/keys/{long_id}/status"):
            r = await c.get(path)
            assert r.status_code == 400 and r.json()["details"][0]["location"] == "path.slave_SAE_ID"
        r = await c.get("/api/v1/keys/SAE_B/dec_keys")
        assert r.status_code == 400 and r.json()["details"][0]["location"] == "query.key_ID"
    await sites.agree()


async def test_openapi_declares_what_the_server_does(server, pki):
    sites, srv = server
    async with httpx.AsyncClient(base_url=srv.url, verify=pki.client_context("SAE_A", "A"), timeout=10) as c:
        spec = (await c.get("/openapi.json")).json()
    cfg = sites.a.config
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    assert spec["x-qkdstack-request-limits"] == {
        "max_url_bytes": MAX_URL_BYTES,
        "max_header_bytes": MAX_HEADER_BYTES,
        "max_body_bytes": MAX_BODY_BYTES,
    }
    ops = {(m, p): op for p, item in spec["paths"].items() for m, op in item.items()}
    assert len(ops) == 5
    for op in ops.values():
        assert set(op["responses"]) == {"200", "400", "401", "503"}
        for code in ("400", "401", "503"):
            assert op["responses"][code]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/Error"
            }
        for param in op["parameters"]:
            if param["in"] == "path":
                assert param["schema"]["maxLength"] == 64
    params = {p["name"]: p for p in ops[("get", "/api/v1/keys/{slave_SAE_ID}/enc_keys")]["parameters"]}
    assert params["number"]["schema"]["minimum"] == 1
    assert params["number"]["schema"]["maximum"] == cfg.max_key_per_request
    assert params["size"]["schema"]["multipleOf"] == 8
    assert params["size"]["schema"]["maximum"] == cfg.max_key_size
    (key_id,) = ops[("get", "/api/v1/keys/{master_SAE_ID}/dec_keys")]["parameters"][1:]
    assert key_id["name"] == "key_ID" and key_id["required"] is True
    key_ids = spec["components"]["schemas"]["KeyIDs"]["properties"]["key_IDs"]
    assert key_ids["minItems"] == 1 and key_ids["maxItems"] == cfg.max_key_per_request
