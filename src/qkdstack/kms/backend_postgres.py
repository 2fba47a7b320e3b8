"""PostgreSQL backend of the key store (psycopg 3); docs/kms.md says what PostgreSQL keeps of erased keys."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from qkdstack.errors import KeyStoreError
from qkdstack.kms.backend import Backend


class PostgresBackend(Backend):
    placeholder = "%s"
    blob = "BYTEA"
    bigint = "BIGINT"

    def __init__(self, url: str) -> None:
        import psycopg

        try:
            self.conn = psycopg.connect(url, autocommit=True)
        except psycopg.Error as exc:
            raise KeyStoreError(f"cannot connect to the PostgreSQL key store: {type(exc).__name__}") from None

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s")

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        cur = self.conn.execute(self._sql(sql), params, prepare=False)
        return cur.fetchall() if cur.description is not None else []

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with self.conn.cursor() as cur:
            cur.executemany(self._sql(sql), rows)

    def begin(self) -> None:
        self.conn.execute("BEGIN")

    def close(self) -> None:
        self.conn.close()
