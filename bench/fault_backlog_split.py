"""Fault benchmark: do batches split when SQS messages come back late during a backlog?

SPEC 4 says a backlog never splits a batch. Messages an ``edp run`` worker received
but did not commit (it was SIGKILLed in the middle of a step, or the step failed)
come back after the queue's visibility timeout, *behind newer messages*. A worker
draining a backlog runs on the newest event time, so unless it holds firing by time
until they are back, their prefix's batch has fired already and the late files open
a second batch. This script counts such splits against ``edp replay`` of the same
stream, which is the reference.

How (everything on 127.0.0.1, bounded by ``--timeout``, stops by itself):

1. moto runs in server mode on a free loopback port, behind a small WSGI tap that
   records, per AWS access key, the receipt handles ReceiveMessage returned and
   DeleteMessage(Batch) deleted; each ``edp run`` process gets its own key
   (``AKIDRUN<n>``; moto maps unknown keys to its default account).
2. A deterministic stream of EventBridge S3 "Object Created" events is generated
   (``--prefixes`` prefixes ``inst/exp-NNN/``, 5..12 files each a few seconds
   apart, prefixes ~60 s apart, starting two days ago: a backlog), written to
   ``stream.jsonl`` and sent, in time order, to one SQS queue.
3. ``edp replay stream.jsonl`` with the same grouping (quiet period 60 s, count
   threshold 1000, max age off: one batch per prefix) gives the reference batches.
4. ``--workers`` ``edp run`` processes (worker ids w1, w2; stdout and JSON Lines
   sinks) consume the queue into one store: a SQLite file in the workdir, or a
   fresh PostgreSQL database on ``--pg-server`` (dropped at the end unless
   ``--keep-db``). At each fraction ``--at`` of the backlog (messages received):

   * ``--scenario kill``: the next worker in turn (w1, w2, w1, ...) is SIGSTOPped
     right after a receive and SIGKILLed if it holds received, undeleted messages
     (else SIGCONT and try again, for at most 5 s, then killed anyway); it is
     restarted at once under the same worker id and store.
   * ``--scenario failed-step`` (SQLite, one worker): another connection holds the
     database with ``BEGIN EXCLUSIVE`` until the worker logs a failed step on
     "database is locked" while it holds received messages (the store waits 30 s
     for a lock), at most ``--lock-max`` seconds. The worker keeps running; the
     failed step's messages come back after the visibility timeout.

   ``--at=`` (empty) disrupts nothing: a control run.
5. Once the queue is empty, no batch is open and the outbox is delivered, the
   workers get SIGTERM.
6. The closed batches of the store (the sinks' events, deduplicated by id, as a
   cross-check) are compared with the reference.

Usage (from the repository root, with the project's virtualenv: moto, boto3, psycopg)::

    .venv/bin/python bench/fault_backlog_split.py --scenario kill
    .venv/bin/python bench/fault_backlog_split.py --scenario failed-step
    .venv/bin/python bench/fault_backlog_split.py --store postgres --workers 2 \\
        --at 0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9

edp runs as ``$EDP_PYTHON -m edp`` with ``PYTHONPATH=$EDP_SRC``: by default this
checkout's ``src/`` and ``.venv/bin/python``, so ``EDP_SRC=/elsewhere/src`` measures
another tree (an older commit) with the same tools.

The summary line (stdout; progress and per-run details go to stderr)::

    scenario=kill store=sqlite workers=1 split_prefixes=0 batches=60 expected=60
    matched=60 lost=0 doubled=0 open_left=0 queue_left=0 msgs_committed=525/525
    inflight_at_disruptions=10,10,10 settled=1 elapsed=41.2s workdir=/tmp/...

* ``split_prefixes``: prefixes with more closed batches than the reference: the
  figure this benchmark is about (0 when no batch split).
* ``batches`` / ``expected``: closed batches / reference batches; ``matched``:
  closed batches with the same bucket, prefix and file count as a reference batch.
* ``lost``: files of the stream in no closed batch; ``doubled``: files counted in
  more than one closed batch (beyond the first). Both must be 0.
* ``open_left``, ``queue_left``: batches still open, messages still queued at the end.
* ``msgs_committed``: the store's ``messages`` counter / messages sent (more than
  sent when a message committed but its delete was lost to a kill).
* ``inflight_at_disruptions``: per disruption, the messages the killed run held
  (kill) or the messages in flight queue-wide when the lock was taken (failed-step);
  0 for a kill means it missed its mark.
* ``settled``: 1 if the run reached step 5 before ``--timeout``; 0 makes the other
  figures a snapshot, not a result.

The workdir keeps the stream, the store (SQLite), every run's command line, stdout
and stderr, and ``result.json`` (also printed by ``--json``), which adds the split
prefixes' batches, the sinks' view, triggers, store counters, per-run log levels
and the disruptions' details. Exit status: 0 whatever was measured, 2 on a harness
error.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import logging
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

    import psycopg
    from mypy_boto3_sqs import SQSClient
    from werkzeug.serving import BaseWSGIServer

CHECKOUT = Path(__file__).resolve().parents[1]
DEFAULT_EDP_SRC = str(CHECKOUT / "src")
DEFAULT_EDP_PYTHON = str(CHECKOUT / ".venv" / "bin" / "python")
BUCKET = "fault-bench"
QUIET = 60  # bucket_threshold_duration
COUNT = 1000  # bucket_threshold_event_count: never reached
GROUPING = ["--prefix-depth", "2", "--threshold-duration", str(QUIET),
            "--threshold-event-count", str(COUNT), "--max-batch-age", "0"]
KILL_GRACE = 5.0  # seconds to catch a worker holding messages before killing it anyway
SQS_ACTIONS = ("ReceiveMessage", "DeleteMessage", "DeleteMessageBatch")

log = logging.getLogger("fault_backlog_split")

JSON = dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class Options:
    """The command line, checked."""

    scenario: str
    store: str
    pg_server: str
    keep_db: bool
    workers: int
    points: list[float]
    prefixes: int
    seed: int
    visibility_timeout: int
    wait_seconds: int
    max_messages: int
    lock_max: float
    timeout: float
    poll: float
    workdir: Path | None
    json: bool
    edp_src: str
    edp_python: str

    @property
    def label(self) -> str:
        return self.scenario if self.points else "control"


# -- the stream ---------------------------------------------------------------------

def iso(epoch: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def make_stream(prefixes: int, seed: int, start: int) -> list[JSON]:
    """EventBridge S3 Object Created events, in time order (stable sort by time)."""
    rng = random.Random(seed)
    files: list[tuple[int, int, int]] = []
    for p in range(prefixes):
        t = start + p * 60 + rng.randint(0, 20)
        for f in range(rng.randint(5, 12)):
            t += rng.randint(0, 2)
            files.append((t, p, f))
    files.sort(key=lambda e: e[0])
    return [{
        "version": "0",
        "id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "detail-type": "Object Created",
        "source": "aws.s3",
        "account": "123456789012",
        "time": iso(t),
        "region": "us-east-1",
        "resources": [f"arn:aws:s3:::{BUCKET}"],
        "detail": {
            "version": "0",
            "bucket": {"name": BUCKET},
            "object": {"key": f"inst/exp-{p:03d}/file-{f:02d}.tif", "size": 1024 + f,
                       "etag": f"{rng.getrandbits(128):032x}",
                       "sequencer": f"{(0x61 << 56) + seq:018X}"},
            "request-id": f"REQ{seq:013d}", "requester": "123456789012",
            "source-ip-address": "10.0.0.1", "reason": "PutObject",
        },
    } for seq, (t, p, f) in enumerate(files, start=1)]


# -- moto, with a tap: who holds which received message ------------------------------

class Tap:
    """WSGI middleware: receipt handles received and not yet deleted, per access key."""

    def __init__(self, app: WSGIApplication) -> None:
        self.app = app
        self.lock = threading.Lock()
        self.held: dict[str, set[str]] = collections.defaultdict(set)
        self.unparsed = 0  # SQS answers the tap could not read

    def outstanding(self, key: str) -> int:
        with self.lock:
            return len(self.held.get(key, ()))

    def __call__(self, environ: WSGIEnvironment,
                 start_response: StartResponse) -> Iterable[bytes]:
        target = environ.get("HTTP_X_AMZ_TARGET", "")
        action = target.split(".", 1)[1] if target.startswith("AmazonSQS.") else ""
        if action not in SQS_ACTIONS:
            return self.app(environ, start_response)
        m = re.search(r"Credential=([^/]+)/", environ.get("HTTP_AUTHORIZATION", ""))
        key = m.group(1) if m else "?"
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        status: list[str] = []

        def record_status(st: str, headers: list[tuple[str, str]],
                          exc_info: Any = None) -> Any:
            status.append(st)
            return start_response(st, headers, exc_info)

        result = self.app(environ, record_status)
        try:
            out = b"".join(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        if status and status[0].startswith("200"):
            try:
                self._record(key, action, body, out)
            except (ValueError, KeyError, TypeError):
                self.unparsed += 1
        return [out]

    def _record(self, key: str, action: str, body: bytes, out: bytes) -> None:
        with self.lock:
            if action == "ReceiveMessage":
                for msg in json.loads(out or b"{}").get("Messages", []):
                    self.held[key].add(msg["ReceiptHandle"])
            elif action == "DeleteMessage":
                self.held[key].discard(json.loads(body)["ReceiptHandle"])
            else:
                ok = {e["Id"] for e in json.loads(out or b"{}").get("Successful", [])}
                for e in json.loads(body).get("Entries", []):
                    if e["Id"] in ok:
                        self.held[key].discard(e["ReceiptHandle"])


class TappedMoto:
    """moto's server on a free loopback port, in a thread, behind a :class:`Tap`."""

    def __init__(self) -> None:
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
        self.tap = Tap(DomainDispatcherApplication(create_backend_app))
        self.server: BaseWSGIServer = make_server(
            "127.0.0.1", 0, self.tap, threaded=True, request_handler=MotoRequestHandler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> TappedMoto:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.thread.join()


@dataclass
class Queue:
    """The SQS queue the workers consume."""

    sqs: SQSClient
    url: str

    def counts(self) -> tuple[int, int]:
        """Messages visible, and received but neither deleted nor visible again."""
        a = self.sqs.get_queue_attributes(QueueUrl=self.url, AttributeNames=[
            "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
        return (int(a["ApproximateNumberOfMessages"]),
                int(a["ApproximateNumberOfMessagesNotVisible"]))

    def send(self, events: list[JSON]) -> None:
        for i in range(0, len(events), 10):
            failed = self.sqs.send_message_batch(QueueUrl=self.url, Entries=[
                {"Id": str(j), "MessageBody": json.dumps(e)}
                for j, e in enumerate(events[i:i + 10])]).get("Failed")
            if failed:
                raise RuntimeError(f"send_message_batch failed: {failed}")


# -- the stores ---------------------------------------------------------------------

OPEN_SQL = "SELECT count(*) FROM batches WHERE state = 'open'"
PENDING_SQL = "SELECT count(*) FROM deliveries WHERE delivered_at IS NULL AND NOT parked"
BATCHES_SQL = ("SELECT batch_id, bucket, prefix, generation, state, object_count, trigger,"
               " first_event_time, last_event_time, fired_at FROM batches"
               " ORDER BY bucket, prefix, generation")
KEYS_SQL = "SELECT batch_id, key FROM batch_objects"
DEAD_SQL = "SELECT count(*) FROM dead_letters"
COUNTERS_SQL = "SELECT name, sum(value) FROM counters GROUP BY name"


@dataclass
class Snapshot:
    """What the store holds at the end."""

    rows: list[JSON]  # every batch, open or closed
    keys: dict[str, list[str]]  # batch id -> its object keys
    counters: dict[str, int]  # the counters table, plus dead_letters
    workers_table: list[JSON] | None = None  # PostgreSQL's workers rows


class SqliteStore:
    """The workers' SQLite file, read (read-only) by the harness."""

    kind = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.url = f"sqlite:///{path}"

    def _connect(self, timeout: float) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=timeout)

    def settled(self) -> bool:
        """No open batch and nothing left to deliver (False: no store yet, or busy)."""
        try:
            with contextlib.closing(self._connect(2)) as conn:
                return bool(conn.execute(OPEN_SQL).fetchone() == (0,)
                            and conn.execute(PENDING_SQL).fetchone() == (0,))
        except sqlite3.Error:
            return False

    def read(self) -> Snapshot:
        with contextlib.closing(self._connect(5)) as conn:
            conn.row_factory = sqlite3.Row
            rows = [dict(r) for r in conn.execute(BATCHES_SQL)]
            conn.row_factory = None
            keys: dict[str, list[str]] = collections.defaultdict(list)
            for batch_id, key in conn.execute(KEYS_SQL):
                keys[batch_id].append(key)
            counters = {name: int(value) for name, value in conn.execute(COUNTERS_SQL)}
            counters["dead_letters"] = conn.execute(DEAD_SQL).fetchone()[0]
        return Snapshot(rows, keys, counters)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the database with ``BEGIN EXCLUSIVE`` (waiting up to 20 s for it)."""
        conn = sqlite3.connect(str(self.path), timeout=20, isolation_level=None)
        try:
            conn.execute("BEGIN EXCLUSIVE")
            yield
            conn.execute("ROLLBACK")
        finally:
            conn.close()


class PostgresStore:
    """A fresh database ``edp_fault_<time>_<pid>`` on a server (trust auth)."""

    kind = "postgres"

    def __init__(self, server: str) -> None:
        self.server = server
        self.name = f"edp_fault_{time.strftime('%H%M%S')}_{os.getpid()}"
        self.url = f"{server}/{self.name}"

    def _connect(self, url: str | None = None) -> psycopg.Connection[Any]:
        import psycopg

        return psycopg.connect(url or self.url, autocommit=True, connect_timeout=5)

    def create(self) -> None:
        from psycopg import sql

        with self._connect(f"{self.server}/postgres") as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.name)))

    def drop(self) -> None:
        from psycopg import sql

        with self._connect(f"{self.server}/postgres") as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(self.name)))

    def settled(self) -> bool:
        """No open batch and nothing left to deliver (False: no schema yet, or an error)."""
        import psycopg

        try:
            with self._connect() as conn:
                return bool(conn.execute(OPEN_SQL).fetchone() == (0,)
                            and conn.execute(PENDING_SQL).fetchone() == (0,))
        except psycopg.Error:
            return False

    def read(self) -> Snapshot:
        from psycopg.rows import dict_row

        with self._connect() as conn:
            rows = conn.cursor(row_factory=dict_row).execute(BATCHES_SQL).fetchall()
            keys: dict[str, list[str]] = collections.defaultdict(list)
            for batch_id, key in conn.execute(KEYS_SQL):
                keys[batch_id].append(key)
            counters = {name: int(value) for name, value in conn.execute(COUNTERS_SQL)}
            dead = conn.execute(DEAD_SQL).fetchone()
            counters["dead_letters"] = dead[0] if dead else 0
            workers = conn.cursor(row_factory=dict_row).execute(
                "SELECT * FROM workers ORDER BY worker_id").fetchall()
        workers_table = [{k: round(v, 1) if isinstance(v, float) else v for k, v in r.items()}
                         for r in workers]
        return Snapshot(rows, keys, counters, workers_table)


Store = SqliteStore | PostgresStore


# -- the workers --------------------------------------------------------------------

class Deadline:
    """The overall time limit (``--timeout``)."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def check(self, what: str) -> None:
        if self.left() <= 0:
            raise TimeoutError(f"overall time limit reached while {what}")


@dataclass
class Worker:
    """One ``edp run`` process (a run); a worker id may have several, one after the other."""

    run: int
    worker_id: str
    proc: subprocess.Popen[bytes]
    access_key: str
    stderr: Path
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    ended_by: str = ""

    def summary(self) -> JSON:
        seconds = (self.ended or time.monotonic()) - self.started
        return {"run": self.run, "worker_id": self.worker_id, "seconds": round(seconds, 1),
                "ended_by": self.ended_by, "rc": self.proc.returncode}

    def log_text(self) -> str:
        return self.stderr.read_text(errors="replace")


@dataclass
class Fleet:
    """The ``edp run`` processes on one queue and store, and what was done to them."""

    opts: Options
    work: Path
    env: dict[str, str]
    queue: Queue
    store: Store
    tap: Tap
    total: int  # messages sent
    runs: list[Worker] = field(default_factory=list)
    live: dict[str, Worker] = field(default_factory=dict)  # worker id -> its current run
    disruptions: list[JSON] = field(default_factory=list)

    def start(self, worker_id: str) -> Worker:
        n = len(self.runs) + 1
        cmd = [self.opts.edp_python, "-m", "edp", "run", "--sqs-queue", self.queue.url,
               "--database-url", self.store.url, "--worker-id", worker_id, "--stdout",
               *GROUPING]
        with (self.work / "run-command.txt").open("a") as f:
            f.write(f"# run {n}\n" + " ".join(cmd) + "\n")
        access_key = f"AKIDRUN{n:04d}"
        stderr = self.work / f"run-{n}.stderr"
        with (self.work / f"run-{n}.stdout").open("wb") as out, stderr.open("wb") as err:
            proc = subprocess.Popen(cmd, cwd=self.work, stdout=out, stderr=err,
                                    env={**self.env, "AWS_ACCESS_KEY_ID": access_key})
        worker = Worker(n, worker_id, proc, access_key, stderr)
        self.runs.append(worker)
        self.live[worker_id] = worker
        log.info("worker run %d (%s) started (pid %d)", n, worker_id, proc.pid)
        return worker

    def exited(self) -> Worker | None:
        """A live worker that exited by itself, if any."""
        return next((w for w in self.live.values() if w.proc.poll() is not None), None)

    def received(self) -> int:
        """Messages no longer visible: received at least once (in flight or deleted)."""
        return self.total - self.queue.counts()[0]

    def wait_received(self, fraction: float, deadline: Deadline) -> bool:
        """Wait until ``fraction`` of the backlog was received, then (kill scenario) for
        the next receive, so that the kill lands between a receive and its delete.
        False if a worker exited first."""
        last = self.received()
        while last < fraction * self.total:
            deadline.check(f"waiting for {fraction:.0%} of the backlog to be received")
            gone = self.exited()
            if gone is not None:
                log.info("worker run %d (%s) exited (rc %s) before the disruption point",
                         gone.run, gone.worker_id, gone.proc.returncode)
                return False
            time.sleep(self.opts.poll)
            last = self.received()
        if self.opts.scenario == "kill":
            give_up = time.monotonic() + KILL_GRACE
            while self.received() == last and time.monotonic() < give_up:
                pass  # (no sleep: the kill should follow the receive as closely as possible)
        return True

    def kill(self, worker: Worker) -> None:
        """SIGSTOP the worker; SIGKILL it if it holds received messages, else SIGCONT and
        try again (for at most ``KILL_GRACE`` seconds, then kill it anyway)."""
        give_up = time.monotonic() + KILL_GRACE
        tries = 0
        while True:
            tries += 1
            worker.proc.send_signal(signal.SIGSTOP)
            time.sleep(0.03)  # (requests it had sent: let moto answer them)
            held = self.tap.outstanding(worker.access_key)
            if held or time.monotonic() > give_up:
                break
            worker.proc.send_signal(signal.SIGCONT)
            time.sleep(0.002 * (tries % 7))
        worker.proc.send_signal(signal.SIGKILL)
        worker.proc.wait()
        worker.ended, worker.ended_by = time.monotonic(), "SIGKILL"
        visible, invisible = self.queue.counts()
        after = worker.ended - worker.started
        self.disruptions.append({
            "kind": "SIGKILL", "run": worker.run, "worker_id": worker.worker_id,
            "tries": tries, "received": self.total - visible, "inflight": held,
            "queue_inflight": invisible, "after_s": round(after, 2)})
        log.info("worker run %d (%s) SIGKILLed after %.1fs: %d/%d received, it held %d "
                 "(%d in flight in the queue; %d SIGSTOP tries)", worker.run,
                 worker.worker_id, after, self.total - visible, self.total, held, invisible,
                 tries)

    @staticmethod
    def locked_step_failures(worker: Worker) -> int:
        """Log records of the worker saying a step (or the relay) failed on the lock."""
        records = re.split(r"\n(?=\d{4}-\d\d-\d\d )", worker.log_text())
        return sum(1 for r in records if "step failed" in r and "database is locked" in r)

    def lock(self, worker: Worker, store: SqliteStore) -> None:
        """Hold the SQLite database until a step with messages failed on it, or for
        ``--lock-max`` seconds. A failure while the worker holds no received message
        is the relay's (it leaves nothing to come again): the lock stays."""
        seen = self.locked_step_failures(worker)
        asked = time.monotonic()
        with store.locked():
            got = time.monotonic()
            visible, invisible = self.queue.counts()
            record: JSON = {"kind": "lock", "received": self.total - visible,
                            "inflight": invisible, "lock_wait_s": round(got - asked, 2),
                            "step_failed": False}
            self.disruptions.append(record)
            log.info("database locked (BEGIN EXCLUSIVE): %d/%d received, %d in flight",
                     self.total - visible, self.total, invisible)
            while time.monotonic() - got < self.opts.lock_max:
                failures = self.locked_step_failures(worker)
                if failures > seen:
                    if self.tap.outstanding(worker.access_key):
                        record["step_failed"] = True
                        break
                    seen = failures
                time.sleep(0.2)
            record["seconds"] = round(time.monotonic() - got, 1)
            record["inflight_at_release"] = self.queue.counts()[1]
        log.info("database released after %ss (a step failed: %s; %d messages invisible)",
                 record["seconds"], record["step_failed"], record["inflight_at_release"])

    def wait_settled(self, deadline: Deadline) -> bool:
        """Queue empty, no open batch, outbox delivered, three polls in a row."""
        stable = 0
        while deadline.left() > 0:
            gone = self.exited()
            if gone is not None:
                log.info("worker run %d (%s) exited by itself (rc %s)",
                         gone.run, gone.worker_id, gone.proc.returncode)
                return False
            # The queue first: once a message is deleted its step committed, so a store
            # read after an empty queue sees every batch it opened.
            visible, invisible = self.queue.counts()
            if visible + invisible == 0 and self.store.settled():
                stable += 1
                if stable >= 3:
                    return True
            else:
                stable = 0
            time.sleep(0.5)
        log.info("time limit reached before the workers settled")
        return False

    def stop_all(self) -> None:
        """SIGTERM every live worker at once, then wait for each (in parallel)."""
        threads = [threading.Thread(target=self.stop, args=(w,)) for w in self.live.values()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def stop(self, worker: Worker) -> None:
        if worker.proc.poll() is None:
            worker.proc.send_signal(signal.SIGTERM)
            try:
                worker.proc.wait(timeout=self.opts.wait_seconds + 12)
                worker.ended_by = "SIGTERM"
            except subprocess.TimeoutExpired:
                worker.proc.kill()
                worker.proc.wait()
                worker.ended_by = "SIGTERM, then SIGKILL (no exit within the grace)"
        else:
            worker.ended_by = worker.ended_by or "exited by itself"
        worker.ended = worker.ended or time.monotonic()

    def kill_all(self) -> None:
        """After a harness error: no worker may outlive the script."""
        for w in self.runs:
            if w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait()


# -- the comparison -----------------------------------------------------------------

def reference(opts: Options, env: dict[str, str], stream: Path, work: Path) -> list[JSON]:
    """The batches ``edp replay`` makes of the stream (their events' details)."""
    cmd = [opts.edp_python, "-m", "edp", "replay", str(stream), *GROUPING]
    (work / "replay-command.txt").write_text(" ".join(cmd) + "\n")
    done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, timeout=120, check=False)
    (work / "replay.stdout").write_bytes(done.stdout)
    (work / "replay.stderr").write_bytes(done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"edp replay failed ({done.returncode}): {done.stderr.decode()[-2000:]}")
    lines = done.stdout.decode().splitlines()
    return [json.loads(line)["detail"] for line in lines if line.strip()]


def sink_events(work: Path) -> dict[str, JSON]:
    """Events the sinks got (JSON Lines file and every run's stdout), deduplicated by id."""
    by_id: dict[str, JSON] = {}
    for path in [work / "events.jsonl", *sorted(work.glob("run-*.stdout"))]:
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("detail-type") == "package-objects-ready":
                by_id.setdefault(event["id"], event)
    return by_id


def compare(ref: list[JSON], snap: Snapshot, events: dict[str, JSON],
            stream: list[JSON]) -> JSON:
    """The store's closed batches against the reference (see the module docstring)."""
    closed = [r for r in snap.rows if r["state"] == "closed"]
    ref_batches = collections.Counter((d["bucket"], d["prefix"], d["object-count"]) for d in ref)
    got_batches = collections.Counter((r["bucket"], r["prefix"], r["object_count"]) for r in closed)
    ref_per_prefix = collections.Counter((d["bucket"], d["prefix"]) for d in ref)
    got_per_prefix = collections.Counter((r["bucket"], r["prefix"]) for r in closed)
    split = sorted(p for p, n in got_per_prefix.items() if n > ref_per_prefix[p])
    merged = [p for p, n in ref_per_prefix.items() if got_per_prefix[p] < n]
    files = {(e["detail"]["bucket"]["name"], e["detail"]["object"]["key"]) for e in stream}
    counted: collections.Counter[tuple[str, str]] = collections.Counter(
        (r["bucket"], k) for r in closed for k in snap.keys.get(r["batch_id"], []))
    sink_per_prefix = collections.Counter(
        (e["detail"]["bucket"], e["detail"]["prefix"]) for e in events.values())
    return {
        "split_prefixes": len(split),
        "batches": len(closed),
        "expected": len(ref),
        "matched": sum((ref_batches & got_batches).values()),
        "lost": len(files - set(counted)),
        "doubled": sum(n - 1 for n in counted.values() if n > 1),
        "files": len(files),
        "sum_object_count": sum(r["object_count"] for r in closed),
        "open_left": sum(1 for r in snap.rows if r["state"] == "open"),
        "merged_prefixes": len(merged),
        "triggers": dict(collections.Counter(r["trigger"] for r in closed)),
        "ref_triggers": dict(collections.Counter(d["trigger"] for d in ref)),
        "sink_events": len(events),
        "sink_split_prefixes": sum(1 for p, n in sink_per_prefix.items() if n > ref_per_prefix[p]),
        "split_detail": {f"{p[0]}/{p[1]}": [
            {"gen": r["generation"], "count": r["object_count"], "trigger": r["trigger"],
             "first": iso(int(r["first_event_time"])), "last": iso(int(r["last_event_time"]))}
            for r in closed if (r["bucket"], r["prefix"]) == p] for p in split},
    }


def stderr_summary(runs: list[Worker]) -> JSON:
    """Per run: log lines by level, and the distinct WARNING/ERROR/CRITICAL messages
    (first 160 characters, digits as N), with their counts."""
    out: JSON = {}
    for w in runs:
        text = w.log_text()
        levels: collections.Counter[str] = collections.Counter()
        messages: collections.Counter[str] = collections.Counter()
        for line in text.splitlines():
            m = re.search(r"\b(DEBUG|INFO|WARNING|ERROR|CRITICAL)\b", line[:80])
            if m:
                levels[m.group(1)] += 1
                if m.group(1) in ("WARNING", "ERROR", "CRITICAL"):
                    messages[re.sub(r"\d+(\.\d+)?", "N", line[m.start():])[:160]] += 1
        out[f"run-{w.run}/{w.worker_id}"] = {
            "levels": dict(levels), "tracebacks": text.count("Traceback"),
            "messages": dict(messages.most_common(12))}
    return out


# -- main ---------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> Options:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--scenario", choices=["kill", "failed-step"], default="kill")
    ap.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite",
                    help="sqlite (a file in the workdir) or postgres (a fresh database on "
                         "--pg-server, dropped at the end)")
    ap.add_argument("--pg-server", default="postgresql://postgres@127.0.0.1:5432",
                    help="PostgreSQL server URL without database (trust auth)")
    ap.add_argument("--keep-db", action="store_true", help="postgres: do not drop the database")
    ap.add_argument("--workers", type=int, choices=[1, 2], default=1,
                    help="edp run workers on the same queue and store (ids w1, w2)")
    ap.add_argument("--at", default=None,
                    help="comma-separated fractions of the backlog (messages received) at "
                         "which to disrupt a worker (default: kill 0.25,0.5,0.75; "
                         "failed-step 0.5); --at= disrupts nothing (a control run)")
    ap.add_argument("--prefixes", type=int, default=60, help="prefixes in the stream (60)")
    ap.add_argument("--seed", type=int, default=1, help="stream seed (1)")
    ap.add_argument("--visibility-timeout", type=int, default=10,
                    help="EDP_SQS_VISIBILITY_TIMEOUT (10)")
    ap.add_argument("--wait-seconds", type=int, default=2, help="EDP_SQS_WAIT_SECONDS (2)")
    ap.add_argument("--max-messages", type=int, default=10, help="EDP_SQS_MAX_MESSAGES (10)")
    ap.add_argument("--lock-max", type=float, default=70.0,
                    help="failed-step: longest the database stays locked (70 s); it is "
                         "released as soon as the worker logs a failed step (after the "
                         "store's 30 s busy timeout)")
    ap.add_argument("--timeout", type=float, default=220.0,
                    help="overall limit in seconds (220); the workers are stopped at it")
    ap.add_argument("--poll", type=float, default=0.02,
                    help="seconds between queue polls when waiting for a disruption point")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where to keep stream, store, logs (default: a new temporary "
                         "directory)")
    ap.add_argument("--json", action="store_true", help="also print the full result as JSON")
    args = ap.parse_args(argv)
    at = args.at if args.at is not None else "0.25,0.5,0.75" if args.scenario == "kill" else "0.5"
    try:
        points = sorted(float(x) for x in at.split(",") if x.strip())
    except ValueError:
        ap.error(f"--at {at!r}: comma-separated fractions, such as 0.25,0.5")
    if any(not 0 <= x <= 1 for x in points):
        ap.error(f"--at {at!r}: fractions of the backlog are between 0 and 1")
    if args.scenario == "failed-step" and (args.store != "sqlite" or args.workers != 1):
        ap.error("--scenario failed-step locks the SQLite file: --store sqlite --workers 1 only")
    return Options(
        scenario=args.scenario, store=args.store, pg_server=args.pg_server,
        keep_db=args.keep_db, workers=args.workers, points=points, prefixes=args.prefixes,
        seed=args.seed, visibility_timeout=args.visibility_timeout,
        wait_seconds=args.wait_seconds, max_messages=args.max_messages,
        lock_max=args.lock_max, timeout=args.timeout, poll=args.poll,
        workdir=args.workdir, json=args.json,
        edp_src=os.environ.get("EDP_SRC", DEFAULT_EDP_SRC),
        edp_python=os.environ.get("EDP_PYTHON", DEFAULT_EDP_PYTHON))


def child_env(opts: Options, endpoint: str, work: Path) -> dict[str, str]:
    """The edp processes' environment: no EDP_*, AWS_* or proxy from ours."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("EDP_", "AWS_")) and k.lower() not in (
               "http_proxy", "https_proxy", "all_proxy", "pythonpath")}
    (work / "no-config.toml").write_text("# empty: the harness sets everything\n")
    env.update({
        "PYTHONPATH": opts.edp_src,
        "PYTHONDONTWRITEBYTECODE": "1",  # (EDP_SRC may be a tree to leave as it is)
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        "EDP_SQS_VISIBILITY_TIMEOUT": str(opts.visibility_timeout),
        "EDP_SQS_WAIT_SECONDS": str(opts.wait_seconds),
        "EDP_SQS_MAX_MESSAGES": str(opts.max_messages),
        "EDP_JSONL_PATH": str(work / "events.jsonl"),
        "EDP_CONFIG": str(work / "no-config.toml"),
    })
    return env


def measure(opts: Options, work: Path, store: Store, stack: contextlib.ExitStack) -> JSON:
    """Steps 1 to 6 of the module docstring; the result (without the comparison's
    context). Everything started is stopped by ``stack``."""
    import boto3

    deadline = Deadline(opts.timeout)
    moto = stack.enter_context(TappedMoto())
    env = child_env(opts, moto.endpoint, work)
    sqs = boto3.client("sqs", endpoint_url=moto.endpoint, region_name="us-east-1",
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    queue = Queue(sqs, sqs.create_queue(QueueName="edp-fault-bench")["QueueUrl"])

    start = (int(time.time()) // 3600 - 48) * 3600  # 2 days ago, on the hour
    stream = make_stream(opts.prefixes, opts.seed, start)
    stream_path = work / "stream.jsonl"
    stream_path.write_text("".join(json.dumps(e, separators=(",", ":")) + "\n" for e in stream))
    queue.send(stream)
    log.info("%d events in %d prefixes sent to %s (%s .. %s)", len(stream), opts.prefixes,
             queue.url, iso(start), stream[-1]["time"])

    ref = reference(opts, env, stream_path, work)
    log.info("reference (edp replay): %d batches, triggers %s", len(ref),
             dict(collections.Counter(d["trigger"] for d in ref)))

    fleet = Fleet(opts, work, env, queue, store, moto.tap, len(stream))
    stack.callback(fleet.kill_all)
    ids = [f"w{i + 1}" for i in range(opts.workers)]
    for worker_id in ids:
        fleet.start(worker_id)
    for i, point in enumerate(opts.points):
        worker = fleet.live[ids[i % len(ids)]]
        if not fleet.wait_received(point, deadline):
            break
        if isinstance(store, SqliteStore) and opts.scenario == "failed-step":
            fleet.lock(worker, store)
        else:
            fleet.kill(worker)
            fleet.start(worker.worker_id)
    settled = fleet.wait_settled(deadline)
    fleet.stop_all()
    visible, invisible = queue.counts()
    snap = store.read()
    if isinstance(store, PostgresStore):
        (work / "batches.json").write_text(json.dumps(snap.rows, indent=1, default=str) + "\n")
    texts = [w.log_text() for w in fleet.runs]
    return {
        **compare(ref, snap, sink_events(work), stream),
        "store_counters": snap.counters,
        "workers_table": snap.workers_table,
        "messages_sent": fleet.total,
        "stderr": stderr_summary(fleet.runs),
        "settled": settled,
        "queue_left": visible + invisible,
        "disruptions": fleet.disruptions,
        "tap_unparsed": moto.tap.unparsed,
        "runs": [w.summary() for w in fleet.runs],
        "warnings": sum(t.count("did not stop cleanly") for t in texts),
        "step_errors": sum(t.count("step failed") for t in texts),
    }


def summary_line(opts: Options, r: JSON) -> str:
    inflight = ",".join(str(d["inflight"]) for d in r["disruptions"]) or "-"
    return (f"scenario={opts.label} store={opts.store} workers={opts.workers} "
            f"split_prefixes={r['split_prefixes']} batches={r['batches']} "
            f"expected={r['expected']} matched={r['matched']} lost={r['lost']} "
            f"doubled={r['doubled']} open_left={r['open_left']} queue_left={r['queue_left']} "
            f"msgs_committed={r['store_counters'].get('messages', 0)}/{r['messages_sent']} "
            f"inflight_at_disruptions={inflight} settled={int(r['settled'])} "
            f"elapsed={r['elapsed_s']}s workdir={r['workdir']}")


def report(r: JSON) -> None:
    """The run's details, on stderr."""
    for prefix, batches in r["split_detail"].items():
        log.info("split %s: %s", prefix, "; ".join(
            f"gen {b['gen']} {b['count']} files {b['first']}..{b['last']} ({b['trigger']})"
            for b in batches))
    for w in r["runs"]:
        log.info("run %s (%s): %ss, ended by %s (rc %s)", w["run"], w["worker_id"],
                 w["seconds"], w["ended_by"], w["rc"])
    for run, info in r["stderr"].items():
        log.info("%s stderr: %s tracebacks=%s", run, info["levels"], info["tracebacks"])
        for msg, n in info["messages"].items():
            log.info("    %d x %s", n, msg)


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # (unwinds the ExitStack: workers, moto, database)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminated)
    sys.dont_write_bytecode = True  # (nothing written into the virtualenv or checkout)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    started = time.monotonic()
    work = opts.workdir or Path(tempfile.mkdtemp(
        prefix=f"edp-fault-{opts.store}-{opts.workers}w-{opts.label}-"))
    work.mkdir(parents=True, exist_ok=True)
    log.info("scenario %s, store %s, %d worker(s), disruptions at %s, EDP_SRC=%s, workdir %s",
             opts.label, opts.store, opts.workers, opts.points, opts.edp_src, work)
    store: Store = PostgresStore(opts.pg_server) if opts.store == "postgres" else (
        SqliteStore(work / "edp.db"))
    try:
        with contextlib.ExitStack() as stack:
            if isinstance(store, PostgresStore):
                store.create()
                if opts.keep_db:
                    log.info("database %s created (kept at the end)", store.url)
                else:
                    stack.callback(store.drop)
                    log.info("database %s created (dropped at the end)", store.url)
                (work / "database.txt").write_text(store.url + "\n")
            result = measure(opts, work, store, stack)
    except Exception as exc:  # the harness failed, not edp: say so, exit 2
        log.exception("harness error")
        print(f"scenario={opts.label} error={type(exc).__name__} workdir={work}")
        return 2
    result.update({
        "scenario": opts.label, "store": opts.store, "n_workers": opts.workers,
        "database": store.url if isinstance(store, PostgresStore) else None,
        "edp_src": opts.edp_src, "edp_python": opts.edp_python, "workdir": str(work),
        "elapsed_s": round(time.monotonic() - started, 1),
    })
    (work / "result.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    report(result)
    if opts.json:
        print(json.dumps(result, indent=2, default=str))
    print(summary_line(opts, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
