"""Property-based fuzzing of the ETSI 014 API from its own OpenAPI description (schemathesis).

The server runs for real (uvicorn, mutual TLS, SQLite stores, two KMEs) in a background thread;
schemathesis generates requests from /openapi.json and sends them with SAE_A's client certificate.
No request may produce a 5xx, and every error carries the ETSI Error body.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from _kms_support import PKI, Sites, StoreFactory

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed (pip install '.[test]')")
requests = pytest.importorskip("requests")
from hypothesis import HealthCheck, settings  # noqa: E402


class ServerThread:
    """Two KMEs with ETSI 014 servers, in an event loop of their own thread."""

    def __init__(self, tmp_path) -> None:
        self.pki = PKI(tmp_path / "pki")
        self.factory = StoreFactory("sqlite", tmp_path)
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            self.stop = asyncio.Event()
            sites = await Sites(self.factory, blocks=4, block_bytes=32 * 2048).start(self.pki)
            self.url = sites.srv_a.url
            self.ready.set()
            await self.stop.wait()
            await sites.stop()

        try:
            asyncio.run(main())
        except BaseException as exc:  # surfaced to the test
            self.error = exc
            self.ready.set()

    def __enter__(self) -> ServerThread:
        self.thread.start()
        self.ready.wait(60)
        if self.error:
            raise self.error
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(30)
        self.factory.close_all()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    (tmp_path_factory.getbasetemp() / "fuzz").mkdir(exist_ok=True)
    with ServerThread(tmp_path_factory.getbasetemp() / "fuzz") as srv:
        yield srv


@pytest.fixture(scope="module")
def session(server):
    s = requests.Session()
    s.trust_env = False  # REQUESTS_CA_BUNDLE would otherwise override the site CA below
    files = server.pki.files["SAE_A"]
    s.cert = (files[0], files[1])
    s.verify = str(server.pki.root / "ca_A.pem")
    yield s
    s.close()


@pytest.fixture(scope="module")
def api_schema(server, session):
    spec = session.get(server.url + "/openapi.json", timeout=10).json()
    return schemathesis.openapi.from_dict(spec)


def test_api_never_fails_on_the_server_side(api_schema, server, session):
    from hypothesis import given
    from hypothesis import strategies as st

    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) == 5  # status, enc_keys (GET, POST), dec_keys (GET, POST)
    seen: set[int] = set()
    for operation in operations:

        @given(case=operation.as_strategy(), known_peer=st.booleans())
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        def check(case, known_peer):
            if known_peer:  # half the cases name the real peer SAE, so the deeper paths are fuzzed too
                for name in case.path_parameters or {}:
                    case.path_parameters[name] = "SAE_B"
            response = case.call(
                base_url=server.url, session=session, timeout=10, verify=session.verify, cert=session.cert
            )
            seen.add(response.status_code)
            if response.status_code == 503:
                # The OpenAPI description declares number/size bounds, so valid requests of up to
                # 128 x 8192 bits are drawn and can drain this small store: ETSI 014 answers 503 then.
                assert response.json()["message"] == "not enough keys available for this request", response.text
                return
            assert response.status_code < 500, (case.method, case.path, response.text)
            if response.status_code >= 400:
                body = response.json()
                assert isinstance(body.get("message"), str), body
                assert response.status_code in (400, 401, 404, 405), response.status_code

        check()
    assert {200, 400} <= seen, seen  # the fuzzer reached both the success and the refusal paths
