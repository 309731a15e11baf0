"""The response journal: every finished response, kept as it arrives, so a crash loses only the
requests in flight.

A row's entry is keyed by what decides its text: the endpoint, the exact body the server received
(``model`` included) and the row's sample index (how many rows of its batch before it have the
same body, so that repeated rows stay separate samples). ``VllmGenerate.submit`` looks a batch up
before sending it and sends only the rows not found; the client hands each successful result to
``record`` as it arrives. Failed rows are never recorded: a rerun sends them again.

The store is one SQLite file in WAL mode (stdlib; a commit survives kill -9, and several processes
may read and write it, waiting on each other's locks). A process writes from one thread, every
``COMMIT_EVERY`` seconds or when a batch is collected (group commits: one fsync for many rows). A
value carries a checksum of its key and bytes: a torn or corrupt record is dropped and its row is
sent again, never read as an answer; a file SQLite finds damaged is removed with a warning.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import errno
import hashlib
import logging
import os
import random
import sqlite3
import threading
import time
import zlib
from collections.abc import Sequence
from typing import Any

import orjson

from .errors import StorageError
from .wire import Result, encode

__all__ = ["Journal", "FILE_NAME", "close_journal", "close_journals", "default_folder", "journal_keys", "open_journal", "remove_journal"]

logger = logging.getLogger(__name__)

FILE_NAME = "journal.sqlite3"
COMMIT_EVERY = 0.5  # seconds: "durable within about a second", one fsync per commit
_LOOKUP_CHUNK = 4096  # keys per SELECT ... IN (SQLite allows 32,766 parameters)
_BUSY_MS = 60_000  # another process holding the write lock (a commit takes milliseconds)
_DAMAGED = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
_SCHEMA_VERSION = 1  # PRAGMA user_version: a file of another layout is dropped, not misread
_FIELDS = ("response", "reasoning", "finish_reason", "prompt_tokens", "completion_tokens", "logprobs", "parsed")
_SCHEMA = "CREATE TABLE IF NOT EXISTS responses (key BLOB PRIMARY KEY, value BLOB NOT NULL, checksum INTEGER NOT NULL) WITHOUT ROWID"


def default_folder() -> str | None:
    """``vllm_generate(cache=True)``'s folder, under datasets' cache directory; None when
    ``datasets.disable_caching()`` turned caching off."""
    import datasets

    if not datasets.is_caching_enabled():
        return None
    return os.path.join(str(datasets.config.HF_DATASETS_CACHE), "vllm_generator")


def journal_keys(path: str, model: str, bodies: Sequence[dict[str, Any]]) -> list[bytes]:
    """Each body's key: the endpoint, the bytes the client sends for it and its sample index
    (the rows before it in ``bodies`` with the same request). Servers, concurrency and retries
    play no part."""
    prefix = path.encode() + b"\0"
    keys: list[bytes] = []
    seen: dict[bytes, int] = {}
    for body in bodies:
        key = hashlib.blake2b(prefix + encode({"model": model, **body}), digest_size=16).digest()
        index = seen.get(key, 0)
        seen[key] = index + 1
        if index:  # the first sample keeps the body's own hash
            key = hashlib.blake2b(key + b"#%d" % index, digest_size=16).digest()
        keys.append(key)
    return keys


def _checksum(key: bytes, value: bytes) -> int:
    # against a disk's damage, not an adversary: CRC-32 catches torn and flipped bytes, cheaply
    return zlib.crc32(value, zlib.crc32(key))


def _pack(result: Result) -> bytes | None:
    r = result  # the fields of _FIELDS, in order
    try:
        return orjson.dumps(
            (r.response, r.reasoning, r.finish_reason, r.prompt_tokens, r.completion_tokens, r.logprobs, r.parsed),
            option=orjson.OPT_SERIALIZE_NUMPY,
        )
    except TypeError:  # a value JSON cannot hold: not journaled, the row is sent again on a rerun
        return None


def _unpack(value: bytes) -> Result:
    fields = orjson.loads(value)
    if not isinstance(fields, list) or len(fields) != len(_FIELDS):
        raise ValueError("not a journal entry")
    return Result(**dict(zip(_FIELDS, fields)))


class Journal:
    """One journal file, used by this process (make it with :func:`open_journal`)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.path = os.path.join(folder, FILE_NAME)
        self.reused = 0  # rows answered from the journal, in this process
        self._logged = 0
        self._pending: collections.deque[tuple[bytes, Result]] = collections.deque()  # loop thread -> writer
        self._written = 0  # records taken and committed (or dropped), for flush
        self._recorded = 0
        self._error: StorageError | None = None
        self._changed = threading.Condition()
        self._closed = False
        self._readers = threading.local()
        self._reader_lock = threading.Lock()
        self._all_readers: list[sqlite3.Connection] = []
        self._pid = os.getpid()
        self._writer_db = self._open()
        self._thread = threading.Thread(target=self._write_loop, name="vllm-generator-journal", daemon=True)
        self._thread.start()

    # -- opening, and dropping a damaged file

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=_BUSY_MS / 1000, isolation_level=None, check_same_thread=False)
        db.execute(f"PRAGMA busy_timeout={_BUSY_MS}")
        return db

    def _open(self) -> sqlite3.Connection:
        """The writer's connection, after checking the file (a damaged one is removed)."""
        try:
            os.makedirs(self.folder, exist_ok=True)
        except OSError as err:
            raise self._storage_error(err)  # noqa: B904 (its cause is set)
        dropped = False
        deadline = time.monotonic() + _BUSY_MS / 1000
        while True:
            db: sqlite3.Connection | None = None
            try:
                db = self._connect()
                self._set_up(db)
                return db
            except sqlite3.Error as err:
                if db is not None:
                    db.close()
                code = getattr(err, "sqlite_errorcode", 0) & 0xFF
                if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) and time.monotonic() < deadline:
                    # another process is creating the file or switching it to WAL, which
                    # SQLite's busy handler does not wait for
                    time.sleep(0.01 + 0.04 * random.random())
                    continue
                if dropped or not self._damaged(err):
                    raise self._storage_error(err)  # noqa: B904 (its cause is set)
                dropped = True
                self._drop(err)

    @staticmethod
    def _set_up(db: sqlite3.Connection) -> None:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # a commit is on disk, not only in the page cache
        # keys are random: inserts touch pages all over the table, which stay cached
        db.execute("PRAGMA cache_size=-65536")
        db.execute(_SCHEMA)
        check = db.execute("PRAGMA quick_check(1)").fetchone()
        if check is None or check[0] != "ok":
            raise sqlite3.DatabaseError(f"quick_check: {check[0] if check else 'no answer'}")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version == 0 and db.execute("SELECT 1 FROM responses LIMIT 1").fetchone() is None:
            db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")  # a new journal
        elif version != _SCHEMA_VERSION:
            raise sqlite3.DatabaseError(f"layout {version}, not {_SCHEMA_VERSION}")

    @staticmethod
    def _damaged(err: sqlite3.Error) -> bool:
        code = getattr(err, "sqlite_errorcode", None)
        # quick_check's own finding carries no code: raised above as a plain DatabaseError
        return (code is not None and code & 0xFF in _DAMAGED) or (code is None and isinstance(err, sqlite3.DatabaseError))

    def _drop(self, err: BaseException) -> None:
        logger.warning("response journal %s is damaged (%s): removed; the rows it held are sent again", self.path, err)
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path + suffix)

    def _storage_error(self, err: BaseException) -> StorageError:
        code = getattr(err, "sqlite_errorcode", None)
        why = {
            sqlite3.SQLITE_FULL: "the disk is full",
            sqlite3.SQLITE_READONLY: "the folder or file is read-only",
            sqlite3.SQLITE_CANTOPEN: "the file cannot be opened or created",
            sqlite3.SQLITE_PERM: "permission denied",
        }.get(code & 0xFF if code is not None else -1, str(err))
        error = StorageError(
            f"cannot write the response journal in {self.folder} ({why}; {err}): free some space or make the folder "
            "writable, or turn the journal off (vllm_generate(cache=False)); responses journaled so far are kept, and "
            "the same command then sends only the rest",
            path=self.folder,
        )
        error.__cause__ = err
        if code is not None and code & 0xFF == sqlite3.SQLITE_FULL:
            # as the disk's own error, so that callers who look for ENOSPC (the recipe runner) find it
            error.__cause__ = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.folder)
            error.__cause__.__cause__ = err
        return error

    # -- lookup, from the map's thread

    def lookup(self, keys: Sequence[bytes]) -> dict[bytes, Result]:
        """The journaled results of ``keys`` (those found; a damaged entry is not found)."""
        self.raise_error()
        found: dict[bytes, Result] = {}
        db = self._reader()
        unique = list(dict.fromkeys(keys))
        try:
            for start in range(0, len(unique), _LOOKUP_CHUNK):
                part = unique[start : start + _LOOKUP_CHUNK]
                query = f"SELECT key, value, checksum FROM responses WHERE key IN ({','.join('?' * len(part))})"
                for key, value, checksum in db.execute(query, part):
                    if checksum != _checksum(key, value):
                        logger.warning("response journal %s: a damaged entry is dropped; its row is sent again", self.path)
                        continue
                    try:
                        found[key] = _unpack(value)
                    except ValueError:
                        logger.warning("response journal %s: an unreadable entry is dropped; its row is sent again", self.path)
        except sqlite3.DatabaseError as err:
            if getattr(err, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_BUSY:
                # another process switching a new file to WAL: those rows are simply sent
                logger.debug("response journal %s busy (%s): %d rows not looked up", self.path, err, len(keys))
                return {}
            if not self._damaged(err):
                raise self._storage_error(err)  # noqa: B904 (its cause is set)
            logger.warning("response journal %s cannot be read (%s): its rows are sent again", self.path, err)
            return {}
        with self._changed:  # the map's thread and a feeder's may both look up
            self.reused += sum(1 for k in keys if k in found)
        return found

    def _reader(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._readers, "db", None)
        if db is None:
            db = self._connect()
            self._readers.db = db
            with self._reader_lock:
                self._all_readers.append(db)
        return db

    # -- recording, from the loop thread: an append, the writer does the rest

    def record(self, key: bytes, result: Result) -> None:
        if result.error is None:
            self._pending.append((key, result))
            self._recorded += 1

    def flush(self, timeout: float = 60) -> None:
        """Wait until everything recorded so far is committed.

        Raises:
            StorageError: the journal cannot be written.
        """
        target = self._recorded
        deadline = time.monotonic() + timeout
        with self._changed:
            self._changed.notify_all()  # commit now, not at the next tick
            while self._written < target and self._error is None and self._thread.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
        self.raise_error()

    def raise_error(self) -> None:
        error = self._error
        if error is not None:
            # a new exception each time: a raised one holds the frames it went through (and
            # what they hold open, a cache writer's file) as long as this journal keeps it
            again = StorageError(str(error), path=error.path)
            again.__cause__ = error.__cause__
            raise again

    # -- the writer thread

    def _write_loop(self) -> None:
        seen, seen_at = 0, time.monotonic()
        while True:
            with self._changed:
                if not self._pending and not self._closed:
                    self._changed.wait(COMMIT_EVERY)
                closed = self._closed
            pending = self._pending
            if pending:  # a deque: the loop thread appends while the writer takes
                self._commit([pending.popleft() for _ in range(len(pending))])
            # one log line once lookups stop finding entries for a while (the map moved on, or ended)
            reused, now = self.reused, time.monotonic()
            if reused != seen:
                seen, seen_at = reused, now
            elif reused != self._logged and (closed or now - seen_at >= COMMIT_EVERY):
                logger.info("reused %d cached responses from the journal %s", reused - self._logged, self.path)
                self._logged = reused
            if closed and not pending:
                if self.reused != self._logged:
                    logger.info("reused %d cached responses from the journal %s", self.reused - self._logged, self.path)
                return

    def _commit(self, batch: list[tuple[bytes, Result]]) -> None:
        rows: list[tuple[bytes, bytes, int]] = []
        for key, result in batch:
            value = _pack(result)
            if value is not None:
                rows.append((key, value, _checksum(key, value)))
        try:
            if self._error is None:
                self._insert(rows)
        except sqlite3.Error as err:
            self._error = self._storage_error(err)
            logger.error("%s", self._error)
        with self._changed:
            self._written += len(batch)
            self._changed.notify_all()

    def _insert(self, rows: list[tuple[bytes, bytes, int]]) -> None:
        for attempt in range(2):
            db = self._writer_db
            try:
                db.execute("BEGIN IMMEDIATE")
                # the first answer stays: a row already read from the journal keeps its answer
                db.executemany("INSERT OR IGNORE INTO responses VALUES (?, ?, ?)", rows)
                db.execute("COMMIT")
                return
            except sqlite3.DatabaseError as err:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                if attempt or not self._damaged(err):
                    raise
                db.close()
                self._drop(err)
                self._writer_db = self._open()

    def close(self) -> None:
        """Commit what is recorded and stop the writer (at exit, and in tests)."""
        if self._pid != os.getpid() or self._closed:
            return
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._thread.join(timeout=60)
        with self._reader_lock:
            for db in self._all_readers:
                db.close()
            self._all_readers.clear()
        self._readers = threading.local()
        self._writer_db.close()


_journals: dict[str, Journal] = {}
_journals_lock = threading.Lock()
# A forked map worker's copies of its parent's journals: never closed nor collected, since closing
# an SQLite connection opened before the fork would drop the locks this process's own one holds.
_inherited: list[Journal] = []


def open_journal(folder: str) -> Journal:
    """This process's journal in ``folder`` (one writer thread per file and process).

    Raises:
        StorageError: the folder or the file cannot be written.
    """
    path = os.path.abspath(folder)
    with _journals_lock:
        journal = _journals.get(path)
        if journal is not None and journal._pid == os.getpid() and journal._error is not None:
            journal.close()  # it failed (a full disk, say), and said so: the next map tries again
        if journal is None or journal._pid != os.getpid() or journal._closed:
            if journal is not None and journal._pid != os.getpid():
                _inherited.append(journal)  # a forked worker: its parent's object, not its thread
            journal = _journals[path] = Journal(path)
        return journal


def close_journal(folder: str) -> None:
    """Commit and close this process's journal in ``folder``, if it is open."""
    with _journals_lock:
        journal = _journals.pop(os.path.abspath(folder), None)
        if journal is not None and journal._pid != os.getpid():
            _inherited.append(journal)
            return
    if journal is not None:
        journal.close()


def remove_journal(folder: str) -> None:
    """Close this process's journal in ``folder`` and delete its files."""
    close_journal(folder)
    path = os.path.join(folder, FILE_NAME)
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path + suffix)


def close_journals() -> None:
    """Commit and close every journal this process has open (at exit; they reopen when used)."""
    with _journals_lock:
        journals = list(_journals.values())
        _journals.clear()
        _inherited.extend(j for j in journals if j._pid != os.getpid())
    for journal in journals:
        journal.close()


def _after_fork() -> None:
    global _journals_lock
    _journals_lock = threading.Lock()  # the parent's may have been held by another thread


atexit.register(close_journals)
os.register_at_fork(after_in_child=_after_fork)
