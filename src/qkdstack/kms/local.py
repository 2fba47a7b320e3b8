"""In-unit key delivery: a Unix domain socket for local consumers, and a Python API in the same process.

For the smallest secure site, where the key consumer runs on the KME's host: no network, no TLS.
The socket admits only configured local users: on every connection the server reads the peer's
credentials from the kernel (``SO_PEERCRED``: pid, uid, gid, which the client cannot forge) and
serves the connection only if the uid is in the allow-list; the uid maps to the SAE ID.

Protocol: JSON lines (one UTF-8 JSON object per line, each way). Requests mirror ETSI 014::

    {"op": "status",   "slave_SAE_ID": "SAE_B"}
    {"op": "enc_keys", "slave_SAE_ID": "SAE_B", "number": 1, "size": 256,
     "additional_slave_SAE_IDs": [], "extension_mandatory": [], "extension_optional": []}
    {"op": "dec_keys", "master_SAE_ID": "SAE_A", "key_IDs": ["<uuid>", ...]}

Answers: ``{"status": 200, "body": <Status or Key container>}`` or
``{"status": 400|401|503, "body": {"message": ..., "details": [...]}}``. A refused peer gets one
401 line and the connection is closed. All semantics come from :class:`~qkdstack.kms.kme.KME`
(the same calls as the REST server), so both interfaces behave identically.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from qkdstack.errors import ChannelError, ConfigError
from qkdstack.kms.kme import KME, KMEError

log = logging.getLogger(__name__)

MAX_LINE = 1 << 20


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a connected Unix socket (Linux SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)


class LocalConsumer:
    """Python API for a key consumer in the same process: the ETSI 014 calls without HTTP.

    ``sae_id`` is the consumer's SAE ID (it must be registered at the KME). Methods return the
    ETSI 014 JSON objects (keys base64) and raise :class:`~qkdstack.kms.kme.KMEError`.
    """

    def __init__(self, kme: KME, sae_id: str) -> None:
        self.kme = kme
        self.sae_id = sae_id

    async def status(self, slave_SAE_ID: str) -> dict[str, Any]:
        return await self.kme.status(self.sae_id, slave_SAE_ID)

    async def enc_keys(
        self,
        slave_SAE_ID: str,
        number: int | None = None,
        size: int | None = None,
        additional_slave_SAE_IDs: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        return await self.kme.enc_keys(self.sae_id, slave_SAE_ID, number, size, additional_slave_SAE_IDs)

    async def dec_keys(self, master_SAE_ID: str, key_IDs: Sequence[str]) -> dict[str, Any]:
        return await self.kme.dec_keys(self.sae_id, master_SAE_ID, list(key_IDs))


async def _dispatch(kme: KME, sae_id: str, req: Any) -> dict[str, Any]:
    if not isinstance(req, dict):
        raise KMEError(400, "bad request format", [{"reason": "a request is a JSON object"}])
    op = req.get("op")
    try:
        if op == "status":
            return await kme.status(sae_id, str(req["slave_SAE_ID"]))
        if op == "enc_keys":
            extra = req.get("additional_slave_SAE_IDs")
            if extra is not None and (not isinstance(extra, list) or not all(isinstance(s, str) for s in extra)):
                raise KMEError(400, "bad request format", [{"reason": "additional_slave_SAE_IDs is a list of strings"}])
            return await kme.enc_keys(
                sae_id,
                str(req["slave_SAE_ID"]),
                req.get("number"),
                req.get("size"),
                extra,
                req.get("extension_mandatory"),
                req.get("extension_optional"),
            )
        if op == "dec_keys":
            ids = req.get("key_IDs")
            if not isinstance(ids, list):
                raise KMEError(400, "bad request format", [{"reason": "key_IDs is a list of key IDs"}])
            return await kme.dec_keys(sae_id, str(req["master_SAE_ID"]), ids)
    except KeyError as exc:
        raise KMEError(400, "bad request format", [{"missing": str(exc.args[0])}]) from None
    raise KMEError(400, "bad request format", [{"reason": "op must be status, enc_keys or dec_keys"}])


class LocalKeyServer:
    """Unix-socket key delivery for ``kme``; ``allowed_uids`` maps admitted uids to their SAE IDs."""

    def __init__(
        self, kme: KME, path: str | os.PathLike[str], allowed_uids: Mapping[int, str], *, mode: int = 0o660
    ) -> None:
        if not allowed_uids:
            raise ConfigError("local delivery needs at least one allowed uid")
        self.kme = kme
        self.path = Path(path)
        self.allowed = dict(allowed_uids)
        self.mode = mode
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if self.path.is_socket():
                self.path.unlink()
        self._server = await asyncio.start_unix_server(self._client, path=str(self.path), limit=MAX_LINE)
        os.chmod(self.path, self.mode)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def __aenter__(self) -> LocalKeyServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            _pid, uid, _gid = peer_credentials(writer.get_extra_info("socket"))
            sae_id = self.allowed.get(uid)
            if sae_id is None:
                log.warning("local key delivery refused uid %d", uid)
                await _write(
                    writer,
                    {"status": 401, "body": {"message": "this local user is not admitted", "details": [{"uid": uid}]}},
                )
                return
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    await _write(writer, {"status": 400, "body": {"message": "request line too long"}})
                    return
                if not line:
                    return
                try:
                    req = json.loads(line)
                    answer = {"status": 200, "body": await _dispatch(self.kme, sae_id, req)}
                except json.JSONDecodeError:
                    answer = {
                        "status": 400,
                        "body": {"message": "bad request format", "details": [{"reason": "invalid JSON"}]},
                    }
                except KMEError as exc:
                    answer = {"status": exc.status, "body": exc.body()}
                await _write(writer, answer)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def _write(writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
    writer.write(json.dumps(obj).encode() + b"\n")
    await writer.drain()


class LocalKeyClient:
    """Client of :class:`LocalKeyServer`: ``async with LocalKeyClient(path) as c: await c.enc_keys(...)``.

    Methods return ``(status, body)``.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> LocalKeyClient:
        self._reader, self._writer = await asyncio.open_unix_connection(self.path, limit=MAX_LINE)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()

    async def request(self, req: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        assert self._reader is not None and self._writer is not None, "use `async with`"
        try:
            self._writer.write(json.dumps(req).encode() + b"\n")
            await self._writer.drain()
        except OSError:
            pass  # a refused client may find the socket closed; the answer line is still readable
        line = await self._reader.readline()
        if not line:
            raise ChannelError("the local key server closed the connection")
        answer = json.loads(line)
        return int(answer["status"]), answer["body"]

    async def status(self, slave_SAE_ID: str) -> tuple[int, dict[str, Any]]:
        return await self.request({"op": "status", "slave_SAE_ID": slave_SAE_ID})

    async def enc_keys(
        self, slave_SAE_ID: str, number: int | None = None, size: int | None = None, **extra: Any
    ) -> tuple[int, dict[str, Any]]:
        return await self.request(
            {"op": "enc_keys", "slave_SAE_ID": slave_SAE_ID, "number": number, "size": size, **extra}
        )

    async def dec_keys(self, master_SAE_ID: str, key_IDs: Sequence[str]) -> tuple[int, dict[str, Any]]:
        return await self.request({"op": "dec_keys", "master_SAE_ID": master_SAE_ID, "key_IDs": list(key_IDs)})


@contextlib.asynccontextmanager
async def serve_local(
    kme: KME, path: str | os.PathLike[str], allowed_uids: Mapping[int, str], *, mode: int = 0o660
) -> AsyncIterator[LocalKeyServer]:
    """Run a :class:`LocalKeyServer` for the duration of the ``async with``."""
    async with LocalKeyServer(kme, path, allowed_uids, mode=mode) as server:
        yield server
