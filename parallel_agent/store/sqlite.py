"""Embedded run store (`sqlite:///path.db`), the default: no server, safe for several processes.

Every call runs on one dedicated thread (never on the event loop, and without tying up the default
executor). Each transition is one `BEGIN IMMEDIATE` transaction, so processes on this machine
serialise on SQLite's write lock; claims use `UPDATE ... RETURNING`. WAL mode lets readers (status,
results) run beside a writer. A busy database is retried with backoff within the retry budget and
then reported as StoreError, never as "database is locked". Durability: WAL with synchronous=NORMAL
survives any process crash; a power cut may lose the last transitions, which then run again.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import struct
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

from parallel_agent.errors import StoreError, UsageError
from parallel_agent.jsonl import dumps, loads
from parallel_agent.store.base import (
    CANCELLED,
    DEFAULT_RETRY_BUDGET_S,
    ChunkResult,
    ChunkSpec,
    ChunkState,
    FailedChunk,
    Lease,
    NodeCounts,
    RetryBudget,
    RunInfo,
    RunStore,
    lease_expired_error,
    mask_url,
    results_batch,
    run_cancelled,
    run_missing,
)

T = TypeVar("T")

#: UPDATE ... RETURNING arrived in SQLite 3.35.
MIN_SQLITE = (3, 35, 0)
#: How long one statement waits for another process's write lock before our own retry loop.
BUSY_TIMEOUT_MS = 2000

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    task_id     TEXT PRIMARY KEY,
    status      TEXT NOT NULL,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL,
    finished_at REAL,
    generation  TEXT NOT NULL,
    output_path TEXT,
    info        BLOB NOT NULL,   -- JSON: the fields that never change
    extra       BLOB NOT NULL    -- JSON object, merged by update_run
);
CREATE TABLE IF NOT EXISTS locks (
    task_id    TEXT PRIMARY KEY,
    owner      TEXT NOT NULL,
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS nodes (     -- one row per (task, node): the counters
    task_id      TEXT NOT NULL,
    node         TEXT NOT NULL,
    seq          INTEGER NOT NULL,
    chunks_total INTEGER NOT NULL DEFAULT 0,
    pending      INTEGER NOT NULL DEFAULT 0,
    leased       INTEGER NOT NULL DEFAULT 0,
    done         INTEGER NOT NULL DEFAULT 0,
    failed       INTEGER NOT NULL DEFAULT 0,
    items_total  INTEGER NOT NULL DEFAULT 0,
    items_done   INTEGER NOT NULL DEFAULT 0,
    items_failed INTEGER NOT NULL DEFAULT 0,
    retries      INTEGER NOT NULL DEFAULT 0,
    sealed       INTEGER NOT NULL DEFAULT 0,
    items_out    INTEGER NOT NULL DEFAULT 0,  -- outputs committed
    PRIMARY KEY (task_id, node)
);
CREATE TABLE IF NOT EXISTS chunks (
    task_id      TEXT NOT NULL,
    node         TEXT NOT NULL,
    idx          INTEGER NOT NULL,
    state        TEXT NOT NULL,
    first_record INTEGER NOT NULL,
    count        INTEGER NOT NULL,
    token        INTEGER NOT NULL DEFAULT 0,
    attempt      INTEGER NOT NULL DEFAULT 0,
    not_before   REAL NOT NULL DEFAULT 0,
    owner        TEXT,
    expires_at   REAL,
    error        TEXT,
    items_ok     INTEGER NOT NULL DEFAULT 0,
    items_failed INTEGER NOT NULL DEFAULT 0,
    duration_s   REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (task_id, node, idx)
);
CREATE TABLE IF NOT EXISTS chunk_data (  -- the blobs, apart: SQLite rewrites a whole row on UPDATE
    task_id TEXT NOT NULL,
    node    TEXT NOT NULL,
    idx     INTEGER NOT NULL,
    payload BLOB,                          -- the input records, until the chunk is done
    result  BLOB,
    errors  BLOB,
    records BLOB,                          -- numbers of the payload's records, if not in a row
    result_records BLOB,                   -- numbers of the result's records, if not in a row
    partial BLOB,                          -- the consuming aggregates' partials of the result
    PRIMARY KEY (task_id, node, idx)
);
CREATE INDEX IF NOT EXISTS chunks_by_state ON chunks (task_id, node, state, idx);
CREATE INDEX IF NOT EXISTS chunks_by_expiry ON chunks (task_id, node, state, expires_at);
"""

_RUN_COLUMNS = "task_id, status, created_at, updated_at, finished_at, generation, output_path"
#: RunInfo fields kept in their own columns; the rest is one JSON blob that never changes.
_COLUMNS = {"task_id", "status", "created_at", "updated_at", "finished_at", "generation"}
_COLUMNS |= {"output_path", "extra"}


class SqliteStore(RunStore):
    """The run store in one SQLite file; see the module docstring for the concurrency story."""

    def __init__(self, url: str) -> None:
        self.url = mask_url(url)
        self.path = sqlite_path(url)
        query = dict(parse_qsl(urlsplit(url).query))
        try:
            self.retry_budget_s = float(query.get("retry_budget", DEFAULT_RETRY_BUDGET_S))
        except ValueError as exc:
            raise UsageError(f"bad retry_budget in store URL {self.url}: {exc}") from None
        self._busy_timeout_ms = max(1, min(BUSY_TIMEOUT_MS, int(self.retry_budget_s * 1000)))
        self._conn: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None

    # -- plumbing --------------------------------------------------------------------------------

    async def _run(self, fn: Callable[[], T]) -> T:
        if self._executor is None:
            raise StoreError(f"store {self.url} is not open")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def _retrying(self, fn: Callable[[sqlite3.Connection], T], *, write: bool) -> T:
        """Run `fn` (in a write transaction if `write`), retrying a busy database within budget."""
        conn = self._conn
        if conn is None:
            raise StoreError(f"store {self.url} is not open")
        budget = RetryBudget(self.retry_budget_s)
        while True:
            try:
                if not write:
                    return fn(conn)
                conn.execute("BEGIN IMMEDIATE")
                try:
                    value = fn(conn)
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
                return value
            except sqlite3.OperationalError as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if not _is_busy(exc):
                    raise StoreError(f"store {self.url} failed: {exc}") from None
                delay = budget.next_delay()
                if delay is None:
                    raise StoreError(
                        f"store {self.url} stayed locked by another process for more than "
                        f"{self.retry_budget_s:g} s{_write_lock_holder(self.path)}"
                    ) from None
                time.sleep(delay)
            except sqlite3.DatabaseError as exc:
                raise StoreError(f"store {self.url} failed: {exc}") from None

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._run(lambda: self._retrying(fn, write=True))

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._run(lambda: self._retrying(fn, write=False))

    # -- lifecycle -------------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the file (0o600) and missing folders (0o700) if needed, then the schema."""
        if sqlite3.sqlite_version_info < MIN_SQLITE:
            raise StoreError(
                f"SQLite {sqlite3.sqlite_version} is too old for {self.url}; pagent needs 3.35 "
                "or newer (or use a redis:// store)"
            )
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pagent-sqlite")
        try:
            self._conn = await self._run(self._connect)
            await self._read(self._check_layout)
            # Only a file without the tables takes the write lock here: readers (status, list,
            # results, failures) must answer while another process holds it, even stopped.
            if not await self._read(_has_schema):
                await self._read(
                    lambda conn: conn.executescript(f"BEGIN IMMEDIATE; {SCHEMA} COMMIT;")
                )
            if await self._read(_lacks_record_numbers):
                await self._write(_add_record_numbers)
        except BaseException:
            await self.close()
            raise

    def _check_layout(self, conn: sqlite3.Connection) -> None:
        """Refuse a state file from before the blobs moved to `chunk_data` (pagent 0.1 dev)."""
        old = conn.execute("SELECT 1 FROM pragma_table_info('chunks') WHERE name = 'payload'")
        if old.fetchone() is not None:
            raise StoreError(
                f"{self.url} was written by an older development version of pagent; "
                "move it away (its runs cannot be resumed) or use another --store"
            )

    def _connect(self) -> sqlite3.Connection:
        try:
            _make_private_dirs(self.path.parent)
            if not self.path.exists():
                fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600)
                os.close(fd)
            conn = sqlite3.connect(
                self.path,
                timeout=self._busy_timeout_ms / 1000,
                isolation_level=None,
                check_same_thread=False,
            )
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open {self.url}: {exc}") from None
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(f"PRAGMA busy_timeout={self._busy_timeout_ms}")
        except sqlite3.Error as exc:
            conn.close()  # a file that is not a database: close what was opened
            raise StoreError(f"cannot open {self.url}: {exc}") from None
        return conn

    async def close(self) -> None:
        conn, executor = self._conn, self._executor
        self._conn = self._executor = None
        if executor is not None:
            if conn is not None:
                await asyncio.get_running_loop().run_in_executor(executor, conn.close)
            executor.shutdown(wait=True)

    # -- runs ------------------------------------------------------------------------------------

    async def create_run(self, info: RunInfo) -> bool:
        fields = asdict(info)
        fixed = dumps({k: v for k, v in fields.items() if k not in _COLUMNS})

        def create(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT generation FROM runs WHERE task_id = ?", (info.task_id,)
            ).fetchone()
            if row is not None:
                return bool(row[0] == info.generation)
            conn.execute(
                f"INSERT INTO runs ({_RUN_COLUMNS}, info, extra) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    info.task_id,
                    info.status,
                    info.created_at,
                    info.updated_at,
                    info.finished_at,
                    info.generation,
                    info.output_path,
                    fixed,
                    dumps(info.extra),
                ),
            )
            return True

        return await self._write(create)

    async def get_run(self, task_id: str) -> RunInfo | None:
        def get(conn: sqlite3.Connection) -> RunInfo | None:
            row = conn.execute(
                f"SELECT {_RUN_COLUMNS}, info, extra FROM runs WHERE task_id = ?", (task_id,)
            ).fetchone()
            return None if row is None else _run_info(row)

        return await self._read(get)

    async def update_run(
        self,
        task_id: str,
        *,
        status: str | None = None,
        finished_at: float | None = None,
        output_path: str | None = None,
        extra: dict[str, Any] | None = None,
        unless_cancelled: bool = False,
    ) -> str:
        now = self._now()

        def update(conn: sqlite3.Connection) -> str:
            row = conn.execute(
                "SELECT extra, status FROM runs WHERE task_id = ?", (task_id,)
            ).fetchone()
            if row is None:
                raise run_missing(self.url, task_id)
            merged = loads(row[0])
            merged.update(extra or {})
            kept = unless_cancelled and row[1] == CANCELLED
            conn.execute(
                "UPDATE runs SET status = COALESCE(?, status), "
                "finished_at = COALESCE(?, finished_at), output_path = COALESCE(?, output_path), "
                "updated_at = ?, extra = ? WHERE task_id = ?",
                (
                    None if kept else status,
                    finished_at,
                    output_path,
                    now,
                    dumps(merged),
                    task_id,
                ),
            )
            return str(row[1] if kept or status is None else status)

        return await self._write(update)

    async def add_to_count(self, task_id: str, key: str, amount: int) -> int:
        def add(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT extra FROM runs WHERE task_id = ?", (task_id,)).fetchone()
            if row is None:
                raise run_missing(self.url, task_id)
            merged = loads(row[0])
            merged[key] = int(merged.get(key) or 0) + amount
            conn.execute("UPDATE runs SET extra = ? WHERE task_id = ?", (dumps(merged), task_id))
            return int(merged[key])

        return await self._write(add)

    async def list_runs(self) -> list[RunInfo]:
        def list_all(conn: sqlite3.Connection) -> list[RunInfo]:
            rows = conn.execute(
                f"SELECT {_RUN_COLUMNS}, info, extra FROM runs ORDER BY created_at, task_id"
            ).fetchall()
            return [_run_info(row) for row in rows]

        return await self._read(list_all)

    async def delete_run(self, task_id: str) -> None:
        def delete(conn: sqlite3.Connection) -> None:
            for table in ("chunk_data", "chunks", "nodes", "locks", "runs"):
                conn.execute(f"DELETE FROM {table} WHERE task_id = ?", (task_id,))

        await self._write(delete)

    # -- lock ------------------------------------------------------------------------------------

    async def acquire_lock(self, task_id: str, owner: str, ttl_s: float) -> bool:
        def acquire(conn: sqlite3.Connection) -> bool:
            now = self._now()
            row = conn.execute(
                "SELECT owner, expires_at FROM locks WHERE task_id = ?", (task_id,)
            ).fetchone()
            if row is not None and row[0] != owner and row[1] > now:
                return False
            conn.execute(
                "INSERT OR REPLACE INTO locks (task_id, owner, expires_at) VALUES (?, ?, ?)",
                (task_id, owner, now + ttl_s),
            )
            return True

        return await self._write(acquire)

    async def renew_lock(self, task_id: str, owner: str, ttl_s: float) -> bool:
        def renew(conn: sqlite3.Connection) -> bool:
            now = self._now()
            cursor = conn.execute(
                "UPDATE locks SET expires_at = ? "
                "WHERE task_id = ? AND owner = ? AND expires_at > ?",
                (now + ttl_s, task_id, owner, now),
            )
            return cursor.rowcount == 1

        return await self._write(renew)

    async def lock_holder(self, task_id: str) -> str | None:
        def holder(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(
                "SELECT owner FROM locks WHERE task_id = ? AND expires_at > ?",
                (task_id, self._now()),
            ).fetchone()
            return None if row is None else str(row[0])

        return await self._read(holder)

    async def lock_state(self, task_id: str) -> tuple[str, float] | None:
        def state(conn: sqlite3.Connection) -> tuple[str, float] | None:
            now = self._now()
            row = conn.execute(
                "SELECT owner, expires_at FROM locks WHERE task_id = ? AND expires_at > ?",
                (task_id, now),
            ).fetchone()
            return None if row is None else (str(row[0]), float(row[1]) - now)

        return await self._read(state)

    async def release_lock(self, task_id: str, owner: str) -> None:
        await self._write(
            lambda conn: conn.execute(
                "DELETE FROM locks WHERE task_id = ? AND owner = ?", (task_id, owner)
            )
        )

    # -- chunks ----------------------------------------------------------------------------------

    def _require_run(self, conn: sqlite3.Connection, task_id: str) -> None:
        if conn.execute("SELECT 1 FROM runs WHERE task_id = ?", (task_id,)).fetchone() is None:
            raise run_missing(self.url, task_id)

    def _ensure_node(self, conn: sqlite3.Connection, task_id: str, node: str) -> None:
        self._require_run(conn, task_id)
        conn.execute(
            "INSERT OR IGNORE INTO nodes (task_id, node, seq) VALUES (?, ?, "
            "(SELECT COALESCE(MAX(seq), 0) + 1 FROM nodes WHERE task_id = ?))",
            (task_id, node, task_id),
        )

    async def add_chunks(self, task_id: str, node: str, chunks: Sequence[ChunkSpec]) -> None:
        if not chunks:
            return

        def add(conn: sqlite3.Connection) -> None:
            self._ensure_node(conn, task_id, node)
            status = conn.execute(
                "SELECT status FROM runs WHERE task_id = ?", (task_id,)
            ).fetchone()
            committing = status is not None and status[0] != CANCELLED
            added = items = done = items_done = 0
            for chunk in chunks:
                key = (task_id, node, chunk.index)
                committed = bool(chunk.partial) and committing
                state, ok = ("done", chunk.count) if committed else ("pending", 0)
                cursor = conn.execute(
                    "INSERT OR IGNORE INTO chunks "
                    "(task_id, node, idx, state, first_record, count, items_ok) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (*key, state, chunk.first_record, chunk.count, ok),
                )
                if cursor.rowcount != 1:
                    continue
                added += 1
                items += chunk.count
                if committed:  # committed as it is added: no payload, an empty result
                    conn.execute(
                        "INSERT INTO chunk_data (task_id, node, idx, result, errors, "
                        "result_records, partial) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (*key, b"", b"[]", chunk.records or None, chunk.partial),
                    )
                    done += 1
                    items_done += chunk.count
                else:
                    conn.execute(
                        "INSERT INTO chunk_data (task_id, node, idx, payload, records) "
                        "VALUES (?, ?, ?, ?, ?)",
                        (*key, chunk.payload, chunk.records or None),
                    )
            _bump(
                conn,
                task_id,
                node,
                chunks_total=added,
                pending=added - done,
                items_total=items,
                done=done,
                items_done=items_done,
                items_out=items_done,
            )

        await self._write(add)

    async def seal(self, task_id: str, node: str) -> None:
        def seal(conn: sqlite3.Connection) -> None:
            self._ensure_node(conn, task_id, node)
            conn.execute(
                "UPDATE nodes SET sealed = 1 WHERE task_id = ? AND node = ?", (task_id, node)
            )

        await self._write(seal)

    async def claim(
        self,
        task_id: str,
        node: str,
        owner: str,
        *,
        lease_s: float,
        limit: int = 1,
        max_attempts: int = 3,
        now: float | None = None,
    ) -> list[Lease]:
        def claim(conn: sqlite3.Connection) -> list[Lease]:
            row = conn.execute("SELECT status FROM runs WHERE task_id = ?", (task_id,)).fetchone()
            if row is None:
                raise run_missing(self.url, task_id)
            if row[0] == CANCELLED:
                raise run_cancelled(task_id)
            at = self._now() if now is None else now
            key = (task_id, node)
            expired = conn.execute(
                "SELECT rowid, idx, attempt FROM chunks WHERE task_id = ? AND node = ? "
                "AND state = 'leased' AND expires_at <= ?",
                (*key, at),
            ).fetchall()
            candidates: list[tuple[int, int, bool]] = []
            exhausted = 0
            for rowid, idx, attempt in expired:
                if attempt >= max_attempts:
                    conn.execute(
                        "UPDATE chunks SET state = 'failed', owner = NULL, error = ? "
                        "WHERE rowid = ?",
                        (lease_expired_error(attempt), rowid),
                    )
                    exhausted += 1
                else:
                    candidates.append((idx, rowid, False))
            pending = conn.execute(
                "SELECT idx, rowid FROM chunks WHERE task_id = ? AND node = ? "
                "AND state = 'pending' AND not_before <= ? ORDER BY idx LIMIT ?",
                (*key, at, limit),
            ).fetchall()
            candidates.extend((idx, rowid, True) for idx, rowid in pending)
            chosen = sorted(candidates)[:limit]
            from_pending = sum(1 for _, _, was_pending in chosen if was_pending)
            rows: list[Any] = []
            if chosen:
                marks = ",".join("?" * len(chosen))
                rows = conn.execute(
                    "UPDATE chunks SET state = 'leased', token = token + 1, "
                    "attempt = attempt + 1, owner = ?, expires_at = ? "
                    f"WHERE rowid IN ({marks}) "
                    "RETURNING idx, token, attempt, first_record, count, expires_at",
                    (owner, at + lease_s, *(rowid for _, rowid, _ in chosen)),
                ).fetchall()
                rows = [(*row, *_payload(conn, task_id, node, row[0])) for row in rows]
            retries = sum(1 for row in rows if row[2] > 1)
            _bump(
                conn,
                task_id,
                node,
                pending=-from_pending,
                leased=from_pending - exhausted,
                failed=exhausted,
                retries=retries,
            )
            return [
                Lease(
                    task_id,
                    node,
                    idx,
                    token,
                    owner,
                    first,
                    count,
                    payload,
                    attempt,
                    expires,
                    numbers,
                )
                for idx, token, attempt, first, count, expires, payload, numbers in sorted(rows)
            ]

        return await self._write(claim)

    async def renew(self, lease: Lease, lease_s: float, *, now: float | None = None) -> bool:
        def renew(conn: sqlite3.Connection) -> bool:
            self._require_run(conn, lease.task_id)
            at = self._now() if now is None else now
            cursor = conn.execute(
                "UPDATE chunks SET expires_at = ? WHERE task_id = ? AND node = ? AND idx = ? "
                "AND state = 'leased' AND token = ?",
                (at + lease_s, lease.task_id, lease.node, lease.index, lease.token),
            )
            return cursor.rowcount == 1

        return await self._write(renew)

    async def commit(
        self,
        lease: Lease,
        *,
        result: bytes,
        errors: bytes,
        items_ok: int,
        items_failed: int,
        duration_s: float,
        records: bytes = b"",
        partial: bytes = b"",
        outputs: int | None = None,
    ) -> bool:
        def commit(conn: sqlite3.Connection) -> bool:
            self._require_run(conn, lease.task_id)
            row = conn.execute(
                "SELECT state, token FROM chunks WHERE task_id = ? AND node = ? AND idx = ?",
                (lease.task_id, lease.node, lease.index),
            ).fetchone()
            if row is None or row[1] != lease.token:
                return False
            if row[0] == ChunkState.DONE.value:
                return True
            if row[0] != ChunkState.LEASED.value:
                return False
            conn.execute(
                "UPDATE chunks SET state = 'done', owner = NULL, items_ok = ?, items_failed = ?, "
                "duration_s = ? WHERE task_id = ? AND node = ? AND idx = ?",
                (items_ok, items_failed, duration_s, *_chunk_key(lease)),
            )
            conn.execute(
                "UPDATE chunk_data SET payload = NULL, records = NULL, result = ?, errors = ?, "
                "result_records = ?, partial = ? WHERE task_id = ? AND node = ? AND idx = ?",
                (result, errors, records or None, partial or None, *_chunk_key(lease)),
            )
            _bump(
                conn,
                lease.task_id,
                lease.node,
                leased=-1,
                done=1,
                items_done=items_ok,
                items_failed=items_failed,
                items_out=items_ok if outputs is None else outputs,
            )
            return True

        return await self._write(commit)

    async def fail(
        self, lease: Lease, error: str, *, retry_in_s: float | None, now: float | None = None
    ) -> ChunkState:
        def fail(conn: sqlite3.Connection) -> ChunkState:
            self._require_run(conn, lease.task_id)
            row = conn.execute(
                "SELECT state, token FROM chunks WHERE task_id = ? AND node = ? AND idx = ?",
                _chunk_key(lease),
            ).fetchone()
            if row is None:
                return ChunkState.FAILED
            if row[0] != ChunkState.LEASED.value or row[1] != lease.token:
                return ChunkState(row[0])
            if retry_in_s is None:
                state, not_before = ChunkState.FAILED, 0.0
            else:
                state = ChunkState.PENDING
                not_before = (self._now() if now is None else now) + retry_in_s
            conn.execute(
                "UPDATE chunks SET state = ?, owner = NULL, error = ?, not_before = ? "
                "WHERE task_id = ? AND node = ? AND idx = ?",
                (state.value, error, not_before, *_chunk_key(lease)),
            )
            _bump(conn, lease.task_id, lease.node, leased=-1, **{state.value: 1})
            return state

        return await self._write(fail)

    async def release(self, lease: Lease) -> None:
        def release(conn: sqlite3.Connection) -> None:
            self._require_run(conn, lease.task_id)
            rows = conn.execute(
                "UPDATE chunks SET state = 'pending', owner = NULL, not_before = 0, "
                "attempt = attempt - 1 WHERE task_id = ? AND node = ? AND idx = ? "
                "AND state = 'leased' AND token = ? RETURNING attempt",
                (*_chunk_key(lease), lease.token),
            ).fetchall()
            if rows:
                retries = -1 if rows[0][0] >= 1 else 0
                _bump(conn, lease.task_id, lease.node, leased=-1, pending=1, retries=retries)

        await self._write(release)

    async def counts(self, task_id: str, node: str) -> NodeCounts:
        def counts(conn: sqlite3.Connection) -> NodeCounts:
            row = conn.execute(
                "SELECT runs.task_id, chunks_total, pending, leased, done, failed, items_total, "
                "items_done, items_failed, retries, sealed, items_out FROM runs LEFT JOIN nodes "
                "ON nodes.task_id = runs.task_id AND nodes.node = ? WHERE runs.task_id = ?",
                (node, task_id),
            ).fetchone()
            if row is None:
                raise run_missing(self.url, task_id)
            total, pending, leased, done, failed, items, ok, bad, retries, sealed, out = (
                value or 0 for value in row[1:]
            )
            return NodeCounts(
                total, pending, leased, done, failed, items, ok, bad, retries, bool(sealed), out
            )

        return await self._read(counts)

    async def nodes(self, task_id: str) -> list[str]:
        def nodes(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                "SELECT node FROM nodes WHERE task_id = ? ORDER BY seq", (task_id,)
            ).fetchall()
            return [row[0] for row in rows]

        return await self._read(nodes)

    async def results(self, task_id: str, node: str) -> AsyncIterator[ChunkResult]:
        batch_size = results_batch(await self.counts(task_id, node))
        after = -1
        while True:

            def batch(conn: sqlite3.Connection, after: int = after) -> list[ChunkResult]:
                rows = conn.execute(
                    "SELECT c.idx, c.first_record, c.count, d.result, d.errors, c.items_ok, "
                    "c.items_failed, c.duration_s, c.attempt, COALESCE(d.result_records, x''), "
                    "COALESCE(d.partial, x'') "
                    "FROM chunks c JOIN chunk_data d "
                    "USING (task_id, node, idx) WHERE c.task_id = ? AND c.node = ? "
                    "AND c.state = 'done' AND c.idx > ? ORDER BY c.idx LIMIT ?",
                    (task_id, node, after, batch_size),
                ).fetchall()
                return [ChunkResult(*row) for row in rows]

            results = await self._read(batch)
            for result in results:
                yield result
            if len(results) < batch_size:
                return
            after = results[-1].index

    async def failed_chunks(self, task_id: str, node: str) -> list[FailedChunk]:
        def failed(conn: sqlite3.Connection) -> list[FailedChunk]:
            rows = conn.execute(
                "SELECT c.idx, c.first_record, c.count, COALESCE(d.payload, x''), c.error, "
                "c.attempt, COALESCE(d.records, x'') FROM chunks c JOIN chunk_data d USING (task_id, node, idx) "
                "WHERE c.task_id = ? AND c.node = ? AND c.state = 'failed' ORDER BY c.idx",
                (task_id, node),
            ).fetchall()
            return [FailedChunk(*row) for row in rows]

        return await self._read(failed)

    async def retry_failed(self, task_id: str, node: str) -> int:
        def retry(conn: sqlite3.Connection) -> int:
            self._require_run(conn, task_id)
            moved = conn.execute(
                "UPDATE chunks SET state = 'pending', attempt = 0, not_before = 0 "
                "WHERE task_id = ? AND node = ? AND state = 'failed'",
                (task_id, node),
            ).rowcount
            _bump(conn, task_id, node, failed=-moved, pending=moved)
            return moved

        return await self._write(retry)

    async def chunk_durations(self, task_id: str, node: str) -> list[float]:
        def durations(conn: sqlite3.Connection) -> list[float]:
            rows = conn.execute(
                "SELECT duration_s FROM chunks WHERE task_id = ? AND node = ? "
                "AND state = 'done' ORDER BY idx",
                (task_id, node),
            ).fetchall()
            return [row[0] for row in rows]

        return await self._read(durations)


def sqlite_path(url: str) -> Path:
    """The file of a `sqlite:///abs` or `sqlite://relative` URL (`~` expanded)."""
    parts = urlsplit(url)
    raw = parts.netloc + parts.path
    if not raw:
        raise UsageError(f"store URL {mask_url(url)} names no file; use sqlite:///path/to/state.db")
    if raw.startswith("//"):
        raw = "/" + raw.lstrip("/")
    return Path(raw).expanduser()


#: Where SQLite's WAL write lock lives: a POSIX lock on this byte of the `-shm` file.
_WAL_WRITE_LOCK_BYTE = 120


def _write_lock_holder(path: Path) -> str:
    """`; held by process PID (its command line)`, for the process holding the database's write
    lock, found with F_GETLK on the WAL index (Linux layout of `struct flock`); else ''."""
    try:
        import fcntl

        layout = struct.Struct("hhqqi")
        fd = os.open(f"{path}-shm", os.O_RDWR)
        try:
            query = layout.pack(fcntl.F_WRLCK, os.SEEK_SET, _WAL_WRITE_LOCK_BYTE, 1, 0)
            kind, _, _, _, pid = layout.unpack(
                fcntl.fcntl(fd, fcntl.F_GETLK, query + bytes(8))[: layout.size]
            )
        finally:
            os.close(fd)
    except (ImportError, OSError, struct.error):
        return ""
    if kind == fcntl.F_UNLCK or pid <= 0:
        return ""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").strip()
        described = f" ({command.decode(errors='replace')[:200]})" if command else ""
    except OSError:
        described = ""
    return f"; its write lock is held by process {pid}{described}"


def _has_schema(conn: sqlite3.Connection) -> bool:
    """True when every table exists (read-only: no lock taken)."""
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    return {"runs", "locks", "nodes", "chunks", "chunk_data"} <= tables


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def _make_private_dirs(folder: Path) -> None:
    """Create `folder` and any missing parents owner-only; existing folders are left alone."""
    missing: list[Path] = []
    current = folder
    while not current.exists():
        missing.append(current)
        current = current.parent
    for path in reversed(missing):
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            continue


def _chunk_key(lease: Lease) -> tuple[str, str, int]:
    return lease.task_id, lease.node, lease.index


def _bump(conn: sqlite3.Connection, task_id: str, node: str, **deltas: int) -> None:
    """Add to a node's counters inside the caller's transaction."""
    changes = {name: delta for name, delta in deltas.items() if delta}
    if not changes:
        return
    assignments = ", ".join(f"{name} = {name} + ?" for name in changes)
    conn.execute(
        f"UPDATE nodes SET {assignments} WHERE task_id = ? AND node = ?",
        (*changes.values(), task_id, node),
    )


def _payload(conn: sqlite3.Connection, task_id: str, node: str, index: int) -> tuple[bytes, bytes]:
    """A chunk's payload and the numbers of its records (empty when missing)."""
    row = conn.execute(
        "SELECT payload, records FROM chunk_data WHERE task_id = ? AND node = ? AND idx = ?",
        (task_id, node, index),
    ).fetchone()
    if row is None:
        return b"", b""
    return bytes(row[0] or b""), bytes(row[1] or b"")


_RECORD_COLUMNS = ("records", "result_records", "partial")


def _missing_record_columns(conn: sqlite3.Connection) -> list[str]:
    names = {row[0] for row in conn.execute("SELECT name FROM pragma_table_info('chunk_data')")}
    return [column for column in _RECORD_COLUMNS if column not in names]


def _lacks_items_out(conn: sqlite3.Connection) -> bool:
    names = {row[0] for row in conn.execute("SELECT name FROM pragma_table_info('nodes')")}
    return "items_out" not in names


def _lacks_record_numbers(conn: sqlite3.Connection) -> bool:
    return bool(_missing_record_columns(conn)) or _lacks_items_out(conn)


def _add_record_numbers(conn: sqlite3.Connection) -> None:
    """Give a state file from before record numbers were kept their columns (NULL: in a row,
    which is what its chunks are)."""
    for column in _missing_record_columns(conn):
        conn.execute(f"ALTER TABLE chunk_data ADD COLUMN {column} BLOB")
    if _lacks_items_out(conn):
        conn.execute("ALTER TABLE nodes ADD COLUMN items_out INTEGER NOT NULL DEFAULT 0")


def _run_info(row: Sequence[Any]) -> RunInfo:
    task_id, status, created, updated, finished, generation, output_path, info, extra = row
    return RunInfo(
        task_id=task_id,
        status=status,
        created_at=created,
        updated_at=updated,
        finished_at=finished,
        generation=generation,
        output_path=output_path,
        extra=loads(extra),
        **loads(info),
    )
