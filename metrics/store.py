"""Where request rows live. One interface, two backends running the same SQL:

* :class:`ClickHouseStore` — a ClickHouse server through clickhouse-connect
  (``INFERSTACK_CLICKHOUSE_URL``);
* :class:`ChdbStore` — chDB, ClickHouse embedded in the process, on a local
  directory (the default: ``make run`` needs no server).

Queries use ClickHouse's own ``{name:Type}`` parameters, which both backends bind
server-side, so the text of every statement is identical on both. (Tests also run
:class:`ClickHouseStore` itself against chDB, through clickhouse-connect's embedded
``chdb://`` interface.)

chDB lets one process at a time open a directory, and the exporter, the API's
``/v1/stats`` and ``inferstack stats`` all need it: a ChdbStore opens its session per
operation under an exclusive file lock and closes it after (about 50 ms), so
several processes on one machine take turns.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import threading
import time
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from metrics.settings import StoreSettings

log = logging.getLogger(__name__)

RAW_TABLE = "requests_raw"
TIMESTAMP_COLUMNS = ("enqueued_at", "claimed_at", "first_token_at", "finished_at", "failed_at", "cancelled_at",
                     "rejected_at", "released_at", "updated_at")


def schema_statements() -> list[str]:
    text = (resources.files("metrics") / "schema.sql").read_text()
    statements = []
    for chunk in text.split("\n;\n"):
        sql = "\n".join(line for line in chunk.splitlines() if not line.lstrip().startswith("--")).strip()
        if sql:
            statements.append(sql)
    return statements


def _clean(value: Any) -> Any:
    """NaN (an empty quantile) -> None; datetimes -> unix seconds; recurse into lists."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


class Store(Protocol):
    def insert(self, rows: list[dict[str, Any]]) -> None:
        """Append rows to ``requests_raw``: every row has the same columns; timestamps
        are unix seconds (None where the request has no such step yet)."""

    def query(self, sql: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Run a SELECT; rows as dicts of plain Python values."""

    def command(self, sql: str) -> None: ...

    def close(self) -> None: ...


# chDB runs ClickHouse inside each short session, and a MergeTree deletes the parts a
# merge replaced only from a background cleanup task, 30-40 s after start by default:
# sessions that live milliseconds never run it, so every insert ever made left a
# directory behind and opening the store (every insert) read them all: 440-660 ms of CPU
# per insert after a day of benchmarks (863 directories for 3 live parts). With the
# cleanup due a second after start, a session held open that long now and then merges
# and cleans up.
CLEANUP_SETTINGS = "cleanup_delay_period = 1, cleanup_delay_period_random_add = 0"
TIDY_EVERY_S = 60.0
TIDY_HOLD_S = 1.5


class ChdbStore:
    def __init__(self, path: Path, database: str = "inferstack"):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.database = database
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        self._thread_lock = threading.Lock()
        self._tidied_at = time.monotonic()
        with self._session(create=True) as s:
            s.query(f"ALTER TABLE {RAW_TABLE} MODIFY SETTING {CLEANUP_SETTINGS}")  # stores made before it too

    @contextmanager
    def _session(self, create: bool = False):
        from chdb.session import Session

        with self._thread_lock, open(self._lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            session = Session(str(self.path))
            try:
                if create:
                    session.query(f"CREATE DATABASE IF NOT EXISTS {self.database}")
                    session.query(f"USE {self.database}")
                    for sql in schema_statements():
                        session.query(sql)
                else:
                    session.query(f"USE {self.database}")
                yield session
            finally:
                session.close()
                fcntl.flock(lock, fcntl.LOCK_UN)

    def insert(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        columns = list(rows[0])
        body = "\n".join(json.dumps(row, ensure_ascii=False) for row in rows)
        with self._session() as s:
            s.query(f"INSERT INTO {RAW_TABLE} ({', '.join(columns)}) FORMAT JSONEachRow\n{body}\n")
            if time.monotonic() - self._tidied_at >= TIDY_EVERY_S:
                self._tidied_at = time.monotonic()
                time.sleep(TIDY_HOLD_S)  # the writer's session stays open for merges and the cleanup

    def part_directories(self) -> int:
        """Part directories of the request table on disk, live or replaced (tests, ops)."""
        with self._session() as s:
            rows = s.query(f"SELECT data_paths FROM system.tables WHERE database = '{self.database}' "
                           f"AND name = '{RAW_TABLE}'", "JSONEachRow").data()
        paths = json.loads(rows.splitlines()[0])["data_paths"] if rows.strip() else []
        return sum(1 for p in paths for d in Path(p).iterdir() if d.is_dir() and d.name.startswith("all_"))

    def query(self, sql: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        with self._session() as s:
            table = s.query(sql, "ArrowTable", params=params or None)
        return [{k: _clean(v) for k, v in row.items()} for row in table.to_pylist()]

    def command(self, sql: str) -> None:
        with self._session() as s:
            s.query(sql)

    def close(self) -> None:
        pass


class ClickHouseStore:
    def __init__(self, url: str, database: str = "inferstack"):
        import clickhouse_connect

        admin = clickhouse_connect.get_client(dsn=url)
        admin.command(f"CREATE DATABASE IF NOT EXISTS {database}")
        admin.close()
        self.client = clickhouse_connect.get_client(dsn=url, database=database)
        self._lock = threading.Lock()  # one HTTP session: one query at a time
        for sql in schema_statements():
            self.client.command(sql)

    def insert(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        columns = list(rows[0])
        data = [[_to_datetime(c, row[c]) for c in columns] for row in rows]
        with self._lock:
            self.client.insert(RAW_TABLE, data, column_names=columns)

    def query(self, sql: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        with self._lock:
            result = self.client.query(sql, parameters=params or None)
        return [{k: _clean(v) for k, v in row.items()} for row in result.named_results()]

    def command(self, sql: str) -> None:
        with self._lock:
            self.client.command(sql)

    def close(self) -> None:
        self.client.close()


def _to_datetime(column: str, value: Any) -> Any:
    if column in TIMESTAMP_COLUMNS and isinstance(value, int | float):
        return datetime.fromtimestamp(value, tz=UTC)
    return value


def open_store(settings: StoreSettings) -> Store:
    if settings.clickhouse_url:
        log.info("metrics store: ClickHouse at %s", settings.clickhouse_url.split("@")[-1])
        return ClickHouseStore(settings.clickhouse_url, settings.clickhouse_database)
    log.info("metrics store: chDB in %s", settings.chdb_dir)
    return ChdbStore(settings.chdb_dir, settings.clickhouse_database)
