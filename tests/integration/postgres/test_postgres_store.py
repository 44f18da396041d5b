"""What only the PostgreSQL store does: migrate once, lock, lease, survive lost connections."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest

from edp.core.batching import KeyMemory
from edp.errors import StoreError
from edp.store import open_store
from edp.store.base import LoadRequest, StepWrite
from edp.store.migrations import latest_version, load_migrations
from edp.store.postgres import PostgresStore
from edp.store.postgres_retry import RetryingTransaction, TransactionConflict
from integration.store_contract.contract_helpers import T0, batch, saved, write_closed, write_open

LATEST = latest_version("postgres")

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]


@pytest.fixture
def store(pg_url: str) -> Iterator[PostgresStore]:
    opened = PostgresStore(pg_url, retry_seconds=10)
    yield opened
    opened.close()


def terminate(pg_url: str, pid: int) -> None:
    """Kill one server backend, as a network cut or a failover would."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))


def test_an_unreachable_server_is_reported_without_the_password() -> None:
    # When a store is opened on a port where nothing listens
    with pytest.raises(StoreError) as caught:
        PostgresStore("postgresql://edp:s3cret@127.0.0.1:9/nope", retry_seconds=0.5)
    # Then the error names the database but not the password
    assert "127.0.0.1:9/nope" in str(caught.value)
    assert "s3cret" not in str(caught.value)


def test_a_server_that_does_not_answer_is_said_once_and_its_error_is_one_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # When a store is opened on a port where nothing listens, with 3 s of patience
    with caplog.at_level(logging.WARNING), pytest.raises(StoreError) as caught:
        PostgresStore("postgresql://edp:s3cret@127.0.0.1:9/nope", retry_seconds=3)
    # Then one warning says why and for how long it tries (there was one per try,
    # naming tenacity's wrapper of a local function), without the password
    warnings = [record.getMessage() for record in caught_records(caplog)]
    assert len(warnings) == 1, warnings
    assert "does not answer" in warnings[0] and "trying again for up to 3s" in warnings[0]
    assert "<locals>" not in warnings[0] and "s3cret" not in warnings[0]
    # And the error is one line (the driver's message has a line break and a tab)
    assert "\n" not in str(caught.value) and "\t" not in str(caught.value)


def caught_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.levelno >= logging.WARNING]


def test_a_database_the_server_does_not_have_is_an_error_at_once(pg_url: str) -> None:
    # Given a running server asked for a database (or a role) it does not have, with
    # an hour of patience for servers that do not answer yet
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(pg_url)
    no_role = parts._replace(netloc="no_such_role_here@" + parts.netloc.rpartition("@")[2])
    for url in (urlunsplit(parts._replace(path="/no_such_database_here")),
                urlunsplit(no_role)):
        # Then the store refuses at once (a retry cannot help), saying why
        with pytest.raises(StoreError, match="does not exist"):
            PostgresStore(url, retry_seconds=3600)


@pytest.mark.timeout(60)  # (retried for the hour of retry_seconds before)
def test_tls_settings_that_cannot_be_met_are_an_error_at_once(pg_url: str) -> None:
    # Given a URL whose TLS settings no retry can meet: a server without TLS says it
    # does not support it, one with TLS cannot be verified against a missing root file
    joiner = "&" if "?" in pg_url else "?"
    url = f"{pg_url}{joiner}sslmode=verify-full&sslrootcert=/nonexistent/r.crt"
    # Then the store refuses at once, saying why
    with pytest.raises(StoreError, match=r"SSL|root certificate file"):
        PostgresStore(url, retry_seconds=3600)


@pytest.mark.parametrize("given", ["", "keepalives_idle=60&tcp_user_timeout=0"])
def test_connections_give_up_on_a_silent_server_unless_the_url_says_otherwise(
    pg_url: str, given: str
) -> None:
    # Given a store opened with or without TCP settings of its own in the URL
    store = PostgresStore.from_url(f"{pg_url}?{given}" if given else pg_url)
    try:
        with store.pool.connection() as conn:
            parameters = conn.info.get_parameters()
    finally:
        store.close()
    # Then its connections use TCP keepalives and a user timeout (a partition is a lost
    # connection within ~30 s, not a query waiting for hours), the URL's values first
    assert parameters["keepalives"] == "1"
    assert parameters["keepalives_interval"] == "5"
    assert parameters["keepalives_count"] == "3"
    expected = {"keepalives_idle": "10", "tcp_user_timeout": "30000"}
    if given:
        expected = {"keepalives_idle": "60", "tcp_user_timeout": "0"}
    assert {k: parameters.get(k) for k in expected} == expected


def test_workers_starting_at_once_migrate_once(pg_url: str) -> None:
    # Given four stores opened on a fresh database at the same moment
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            open_store(pg_url).close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Then all succeed and every migration is recorded once
    assert errors == []
    with psycopg.connect(pg_url) as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_migrations")]
    assert versions == [m.version for m in load_migrations("postgres")]


def create_version_1(pg_url: str) -> None:
    """A database as the first schema alone made it (an older edp's)."""
    [first] = [m for m in load_migrations("postgres") if m.version == 1]
    with psycopg.connect(pg_url) as conn:
        conn.execute(first.sql.encode())
        conn.execute("CREATE TABLE schema_migrations (version integer PRIMARY KEY,"
                     " name text NOT NULL, applied_at double precision NOT NULL)")
        conn.execute("INSERT INTO schema_migrations VALUES (1, %s, 0)", (first.name,))


def test_a_database_at_version_1_upgrades_to_the_replay_queue(pg_url: str) -> None:
    # Given a database created by the first schema only
    create_version_1(pg_url)
    with psycopg.connect(pg_url) as conn:
        conn.execute("INSERT INTO key_memory (bucket, key, sequencer, seen_at, batch_id)"
                     " VALUES ('bkt', 'a/b/c', '0A', 5.0, 'b-1')")
    # When a store opens it
    store = open_store(pg_url)
    try:
        # Then it is at the latest version, with the replay workers' tables, and its key
        # memories load with no last write known
        assert store.schema_version() == (LATEST, LATEST)
        assert store.stats()["open_batches"] == 0
        with store.transaction() as tx:
            state = tx.load(LoadRequest(object_keys={("bkt", "a/b/c")}))
        assert state.keys == {("bkt", "a/b/c"): KeyMemory("0A", 5.0, "b-1")}
    finally:
        store.close()
    with psycopg.connect(pg_url) as conn:
        tables = {r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert {"replay_queue", "replay_progress", "batches"} <= tables


def edp_db(command: str, pg_url: str) -> subprocess.CompletedProcess[str]:
    """``edp db COMMAND --database-url pg_url`` in a process of its own."""
    return subprocess.run([sys.executable, "-m", "edp", "db", command, "--database-url", pg_url],
                          capture_output=True, text=True, timeout=60, check=False)


def test_db_commands_show_the_schema_version(pg_url: str) -> None:
    # When `edp db upgrade` then `edp db status` run on the database
    for command in ("upgrade", "status"):
        done = edp_db(command, pg_url)
        # Then each says the schema is at the latest version
        assert done.returncode == 0, done.stderr
        assert f"schema version {LATEST} (latest {LATEST})" in done.stdout
    assert "open_batches: 0" in done.stdout


def test_db_status_reports_pending_migrations_without_applying_them(pg_url: str) -> None:
    # Given a database created by the first schema only (an older edp's)
    create_version_1(pg_url)
    # When `edp db status` runs on it
    done = edp_db("status", pg_url)
    # Then it reports version 1 and the migrations pending, and applied none
    assert done.returncode == 0, done.stderr
    assert f"schema version 1 (latest {LATEST})" in done.stdout
    assert ("pending migrations: 0002_replay_queue.sql, 0003_key_memory_last_write.sql, "
            "0004_sinks.sql, 0005_worker_hold.sql, 0006_worker_hold_until.sql, "
            "0007_key_memory_last_write_backfill.sql") in done.stdout
    with psycopg.connect(pg_url) as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_migrations")]
        replay_queue = conn.execute("SELECT to_regclass('replay_queue')").fetchone()
    assert versions == [1]
    assert replay_queue == (None,)


def test_a_relay_leases_what_it_takes_until_its_connection_is_gone(
    store: PostgresStore, pg_url: str
) -> None:
    # Given two events pending for s1, taken by another worker's relay
    write_closed(store, batch("b-1", prefix="1/"), batch("b-2", prefix="2/"))
    other = PostgresStore(pg_url)
    taken = other.pending("s1", limit=10, now=T0)
    # Then this worker gets nothing while that lease holds
    assert [e.event_id for e in taken] == ["ev-b-1", "ev-b-2"]
    assert store.pending("s1", limit=10, now=T0) == []
    # When the other worker dies (its connections close) before marking them
    other.close()
    # Then the events are pending again here; and a lease also runs out in time
    assert [e.event_id for e in store.pending("s1", limit=10, now=T0)] == ["ev-b-1", "ev-b-2"]
    assert [e.event_id for e in store.pending("s1", limit=1, now=T0 + 3600)] == ["ev-b-1"]


def test_a_lost_connection_mid_transaction_is_replayed_unnoticed(
    store: PostgresStore, pg_url: str
) -> None:
    # Given a step that loaded its working set
    with store.transaction() as tx:
        assert isinstance(tx, RetryingTransaction)
        tx.load(LoadRequest(batch_keys={("bkt", "a/b/")}))
        assert tx.conn is not None
        # When its connection is cut before it writes and commits
        terminate(pg_url, tx.conn.info.backend_pid)
        tx.save(StepWrite(open_batches=[saved(batch())]), sinks=[], now=T0)
        tx.add_counters({"events.counted": 1})
    # Then the step was replayed on a new connection and committed once
    assert tx.replays == 1
    assert store.get_batch("b-1").state == "open"
    assert store.counters() == {"events.counted": 1}


def test_a_lost_connection_after_the_state_changed_fails_the_step(
    store: PostgresStore, pg_url: str
) -> None:
    def step() -> None:
        # Given a step that loaded the prefix a/b/, then lost its connection
        with store.transaction() as tx:
            tx.load(LoadRequest(batch_keys={("bkt", "a/b/")}))
            assert isinstance(tx, RetryingTransaction) and tx.conn is not None
            terminate(pg_url, tx.conn.info.backend_pid)
            # ... while another worker opened a batch there
            write_open(store, batch("b-other"))
            # When the step writes its own view and commits
            tx.save(StepWrite(open_batches=[saved(batch("b-mine"))]), sinks=[], now=T0)

    with pytest.raises(TransactionConflict):
        step()
    # Then it fails instead of overwriting the other worker's batch
    assert [b.batch_id for b in store.list_batches(state="open")] == ["b-other"]



def lose_the_answer_to_the_next_commit(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The next COMMIT reaches the server and commits; its answer is lost on the way
    back (the connection breaks): the client sees a lost connection."""
    real = psycopg.Connection.commit
    lost: list[int] = []

    def commit(self: psycopg.Connection[object]) -> None:
        real(self)
        if not lost:
            lost.append(self.info.backend_pid)
            raise psycopg.OperationalError("connection lost (the COMMIT's answer with it)")

    monkeypatch.setattr(psycopg.Connection, "commit", commit)
    return lost


@pytest.mark.parametrize("changes_its_reads", [False, True])
def test_a_step_whose_commit_answer_was_lost_after_it_committed_is_done_once(
    store: PostgresStore, monkeypatch: pytest.MonkeyPatch, changes_its_reads: bool
) -> None:
    from edp.store.base import DeadLetter

    # Given a step that writes a dead letter and counters (its reads do not change by
    # its own writes), or that also opens a batch on the prefix it loaded (they do)
    with store.transaction() as tx:
        tx.load(LoadRequest(batch_keys={("bkt", "a/b/")}))
        if changes_its_reads:
            tx.save(StepWrite(open_batches=[saved(batch())]), sinks=[], now=T0)
        tx.add_dead_letters([DeadLetter("test", "message 1", "not JSON", "{", T0)])
        tx.add_counters({"dead_letters": 1})
        # When the server commits it and the answer is lost
        lost = lose_the_answer_to_the_next_commit(monkeypatch)
    # Then the step is done, once: the server said it committed (neither written twice,
    # nor failed as changed by another worker)
    assert lost and isinstance(tx, RetryingTransaction) and tx.replays == 0
    assert [d.location for d in store.dead_letters()] == ["message 1"]
    assert store.counters() == {"dead_letters": 1}
    assert [b.batch_id for b in store.list_batches(state="open")] == (
        ["b-1"] if changes_its_reads else [])


def test_a_transaction_still_in_progress_after_its_lost_commit_is_ended_not_waited_for(
    store: PostgresStore, pg_url: str
) -> None:
    # Given a transaction whose client is gone but whose server process has not
    # noticed yet (it still holds its uncommitted write), and an id the server never
    # gave (a replica promoted after a failover)
    stuck = psycopg.connect(pg_url)
    stuck.execute("CREATE TABLE IF NOT EXISTS h_probe (n int)")
    stuck.commit()
    stuck.execute("INSERT INTO h_probe VALUES (1)")
    row = stuck.execute("SELECT txid_current(), pg_backend_pid()").fetchone()
    assert row is not None
    xid, pid = int(row[0]), int(row[1])
    with store.transaction() as tx:
        assert isinstance(tx, RetryingTransaction)
        # When a step asks whether they committed
        # Then the first is ended (its process terminated), so the answer is final: no
        assert tx._committed(xid, pid) is False
        assert tx._committed(xid + 10**9, pid) is False
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT count(*) FROM h_probe").fetchone() == (0,)
        gone = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s",
                            (pid,)).fetchone()
    assert gone == (0,)
    stuck.close()

def test_a_step_on_a_prefix_waits_for_the_step_holding_it(
    store: PostgresStore, pg_url: str
) -> None:
    # Given a step of worker A holding prefix a/b/
    other = PostgresStore(pg_url)
    seen: list[list[str]] = []

    def worker_b() -> None:
        with other.transaction() as tx:
            state = tx.load(LoadRequest(batch_keys={("bkt", "a/b/")}))
            seen.append([b.batch_id for b in state.batches])

    with store.transaction() as tx:
        tx.load(LoadRequest(batch_keys={("bkt", "a/b/")}))
        # When worker B starts a step on the same prefix
        thread = threading.Thread(target=worker_b)
        thread.start()
        time.sleep(0.5)
        # Then B waits
        assert seen == []
        tx.save(StepWrite(open_batches=[saved(batch())]), sinks=[], now=T0)
    thread.join(timeout=30)
    other.close()
    # And, once A committed, B sees A's batch
    assert seen == [["b-1"]]


def test_due_batches_that_another_step_holds_are_skipped(
    store: PostgresStore, pg_url: str
) -> None:
    # Given two due batches, and worker A's step holding the prefix of one
    write_open(store, batch("b-held", prefix="h/"), batch("b-free", prefix="f/"), deadline=T0)
    other = PostgresStore(pg_url)
    with store.transaction() as tx:
        tx.load(LoadRequest(batch_keys={("bkt", "h/")}))
        # When worker B looks for due batches
        with other.transaction() as tx_b:
            due = tx_b.load(LoadRequest(due_until=T0 + 1))
    other.close()
    # Then B takes only the free one: the held one is A's to fire or extend
    assert [b.batch_id for b in due.batches] == ["b-free"]


def test_the_due_batch_query_is_an_index_scan(store: PostgresStore, pg_url: str) -> None:
    # Given 50,000 open batches
    with psycopg.connect(pg_url) as conn:
        conn.execute(
            "INSERT INTO batches (batch_id, bucket, prefix, generation, state, object_count,"
            " first_activity, last_activity, first_event_time, last_event_time, deadline,"
            " deadline_trigger) SELECT 'b' || i, 'bkt', 'p' || i || '/', 1, 'open', 1,"
            " i, i, i, i, i + 300, 'duration' FROM generate_series(1, 50000) AS i"
        )
        conn.execute("INSERT INTO prefixes SELECT 'bkt', 'p' || i || '/', 1"
                     " FROM generate_series(1, 50000) AS i")
        conn.execute("ANALYZE")
        conn.commit()
        # When the due-batch query is planned
        plan = "\n".join(r[0] for r in conn.execute(
            "EXPLAIN SELECT p.bucket, p.prefix FROM batches b JOIN prefixes p"
            " ON p.bucket = b.bucket AND p.prefix = b.prefix"
            " WHERE b.state = 'open' AND b.deadline <= 1000 ORDER BY b.deadline, b.batch_id"
            " LIMIT 5000 FOR UPDATE OF p SKIP LOCKED"
        ))
    # Then it reads the partial deadline index, not the table
    assert "batches_due" in plan, plan
    with store.transaction() as tx:
        assert len(tx.load(LoadRequest(due_until=1000, due_limit=5000)).batches) == 700


def test_every_foreign_key_leads_an_index(store: PostgresStore, pg_url: str) -> None:
    # Given the latest schema
    with psycopg.connect(pg_url) as conn:
        # When the foreign keys and the indexes of their tables are listed
        keys = conn.execute(
            "SELECT conname, conrelid::regclass::text, conkey FROM pg_constraint"
            " WHERE contype = 'f' AND connamespace = 'public'::regnamespace").fetchall()
        unindexed = [name for name, table, columns in keys if not conn.execute(
            "SELECT 1 FROM pg_index WHERE indrelid = %s::regclass"
            " AND (indkey::int2[])[0:%s] = %s::int2[]",
            (table, len(columns) - 1, columns)).fetchone()]
    # Then each is the leading columns of an index: deleting a referenced row (history
    # pruning deletes outbox rows) looks its references up instead of reading the table
    assert unindexed == []


def test_the_pending_query_finds_its_order_barrier_once(store: PostgresStore,
                                                        pg_url: str) -> None:
    # Given a backlog of 20,000 deliveries for one sink
    from edp.store.postgres import PENDING_SQL, pending_params

    with psycopg.connect(pg_url) as conn:
        conn.execute("INSERT INTO outbox (event_id, kind, payload, created_at)"
                     " SELECT 'e' || i, 'k', '{}', 0 FROM generate_series(1, 20000) AS i")
        conn.execute("INSERT INTO deliveries (sink, seq, event_id)"
                     " SELECT 's', seq, event_id FROM outbox")
        conn.execute("ANALYZE")
        conn.commit()
        # When the relay's query is planned
        plan = "\n".join(r[0] for r in conn.execute(
            "EXPLAIN " + PENDING_SQL, pending_params("s", limit=500, now=10.0, lease=60.0)))
        conn.rollback()
    # Then the first event that waits for its retry is looked up once (an InitPlan), not
    # once per candidate row (a correlated SubPlan: seconds per page at 100k pending)
    assert "InitPlan" in plan, plan
    assert len(store.pending("s", limit=500, now=10.0)) == 500


def test_a_worker_frozen_inside_a_step_holds_others_back_only_so_long(pg_url: str) -> None:
    # Given worker A, whose sessions the server ends after 1 s idle in a transaction,
    # frozen inside a step that holds prefix a/b/ (SIGSTOP, a paused container...)
    frozen = PostgresStore(pg_url, retry_seconds=10, idle_in_transaction=1.0)
    other = PostgresStore(pg_url, retry_seconds=10)
    done: list[float] = []

    def worker_b() -> None:
        started = time.monotonic()
        with other.transaction() as tx:
            tx.load(LoadRequest(batch_keys={("bkt", "a/b/")}))
            tx.save(StepWrite(open_batches=[saved(batch("b-of-b"))]), sinks=[], now=T0)
        done.append(time.monotonic() - started)

    def frozen_step() -> None:
        with frozen.transaction() as tx:
            tx.load(LoadRequest(batch_keys={("bkt", "a/b/")}))
            # When worker B starts a step on the same prefix while A stays frozen
            thread = threading.Thread(target=worker_b)
            thread.start()
            thread.join(timeout=20)
            # Then B's step went through once A had been idle for 1 s (it waited for
            # as long as A was frozen before)
            assert done and done[0] < 10, done
            # And when A wakes up, its step fails (the prefix changed meanwhile): its
            # input was not acknowledged and comes again, nothing is doubled
            tx.save(StepWrite(open_batches=[saved(batch("b-of-a"))]), sinks=[], now=T0)

    try:
        with pytest.raises(TransactionConflict):
            frozen_step()
        assert [b.batch_id for b in other.list_batches(state="open")] == ["b-of-b"]
    finally:
        frozen.close()
        other.close()


def test_a_step_whose_session_the_server_ended_as_idle_runs_again(pg_url: str) -> None:
    # Given a step that loaded its working set and then sat idle past the server's
    # idle-in-transaction timeout (a frozen worker that wakes up; nobody else came)
    store = PostgresStore(pg_url, retry_seconds=10, idle_in_transaction=1.0)
    try:
        with store.transaction() as tx:
            tx.load(LoadRequest(batch_keys={("bkt", "a/b/")}))
            time.sleep(2.0)
            # When its next statement is a plain one (an observer's timer), which the
            # server answers with SQLSTATE 25P03 rather than a lost connection
            tx.set_timer("package-ready", "k", due_at=T0, payload="{}")
            tx.save(StepWrite(open_batches=[saved(batch())]), sinks=[], now=T0)
        # Then the step ran again on a new connection and committed once
        assert isinstance(tx, RetryingTransaction) and tx.replays == 1
        assert store.get_batch("b-1").state == "open"
        assert store.next_timer_due() == T0
    finally:
        store.close()


def test_workers_read_the_database_server_s_clock_whatever_their_own_says(
    store: PostgresStore,
) -> None:
    # Given a machine whose clock runs 3 s ahead (the server's is the real one here)
    real = time.time
    store.local_clock = lambda: real() + 3.0
    # When a worker on this machine reads the store's wall clock
    read = store.wall_clock()
    # Then it reads the server's, not its own: two workers whose clocks disagree by
    # seconds agree on deadlines (a worker 3 s fast split batches the others merged)
    assert abs(read - real()) < 0.5, read - real()
    # And the offset is kept: later reads need no round trip and stay right
    assert abs(store.wall_clock() - real()) < 0.5


def test_a_clock_read_while_the_server_is_unreachable_is_quick_and_keeps_the_offset(
    pg_url: str,
) -> None:
    # Given a store that measured its offset to the server's clock, then lost the server
    store = PostgresStore(pg_url, retry_seconds=10)
    store.local_clock = lambda: time.time() + 3.0
    assert abs(store.wall_clock() - time.time()) < 0.5
    store.pool.close()
    store._clock_measured = -math.inf  # (a minute later: time to measure again)
    # When a worker reads the clock
    started = time.monotonic()
    read = store.wall_clock()
    # Then it answers at once with the offset it had (no waiting out the outage)
    assert time.monotonic() - started < 3
    assert abs(read - time.time()) < 0.5


@pytest.fixture
def two_processes(pg_url: str, monkeypatch: pytest.MonkeyPatch
                  ) -> Iterator[tuple[PostgresStore, PostgresStore]]:
    """Two processes' stores on the test database, whose claims of a worker id held by
    another give up after 0.3 s."""
    from edp.store import postgres_workers

    monkeypatch.setattr(postgres_workers, "CLAIM_PATIENCE", 0.3)
    stores = PostgresStore(pg_url), PostgresStore(pg_url)
    yield stores
    for opened in stores:
        opened.close()


def test_a_worker_id_whose_session_was_lost_is_taken_back_or_refused_to_a_twin(
    pg_url: str, two_processes: tuple[PostgresStore, PostgresStore]
) -> None:
    from edp.errors import EdpError

    first, twin = two_processes
    # Given a process holding worker id "w" whose session the server then ended
    # (a restart, a partition, an administrator)
    first.claim_worker_id("w")
    assert first._member is not None
    terminate(pg_url, first._member.info.backend_pid)
    # When it checks its id, Then it takes it back on a new session
    first.claim_worker_id("w")
    with pytest.raises(EdpError, match="in use by another live process"):
        twin.claim_worker_id("w")
    # Given its session lost again, and a twin that took the id meanwhile
    assert first._member is not None
    terminate(pg_url, first._member.info.backend_pid)
    twin.claim_worker_id("w")
    # When it checks its id, Then it learns the id is no longer its own
    with pytest.raises(EdpError, match="in use by another live process"):
        first.claim_worker_id("w")


def test_the_server_drops_the_session_of_a_lost_host_within_a_minute(
    store: PostgresStore,
) -> None:
    # Given a store's pooled session over TCP, Then the server's own keepalive probes a
    # silent peer after 30 s (a worker's host lost sends no FIN: its worker id's lock
    # would stay for the kernel's two hours)
    with store.pool.connection() as conn:
        settings = {name: conn.execute(f"SHOW {name}").fetchone() for name in (
            "tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count")}
    assert settings == {"tcp_keepalives_idle": ("30",), "tcp_keepalives_interval": ("10",),
                        "tcp_keepalives_count": ("3",)}


def test_a_worker_id_given_up_at_a_clean_stop_is_free_at_once_and_logs_no_warning(
    two_processes: tuple[PostgresStore, PostgresStore], caplog: pytest.LogCaptureFixture
) -> None:
    first, twin = two_processes
    # Given a process holding worker id "w", checked again since (the lock is re-entrant)
    first.claim_worker_id("w")
    first.claim_worker_id("w")
    # When it gives the id up, as every daemon and replay worker does at a clean stop
    with caplog.at_level(logging.WARNING):
        first.release_worker_id()
    # Then nothing is logged (psycopg's pool warned of a "closed connection" returned to
    # it, on stderr at every `edp watch`/`serve`/`run` stop and replay worker's end)
    assert [record.getMessage() for record in caplog.records] == []
    # And the id is free for another process at once, and the pool's connections work
    twin.claim_worker_id("w")
    with first.pool.connection() as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_a_worker_id_held_by_a_silent_worker_is_taken_over_and_a_live_ones_is_not(
    two_processes: tuple[PostgresStore, PostgresStore],
) -> None:
    from edp.errors import EdpError

    old, new = two_processes
    # Given a worker "w" holding its id and heartbeating
    old.claim_worker_id("w")
    beating = threading.Event()

    def beat() -> None:
        while not beating.wait(0.1):
            old.heartbeat("w", clock=T0, now=old.wall_clock())

    old.heartbeat("w", clock=T0, now=old.wall_clock())
    beats = threading.Thread(target=beat)
    beats.start()
    # When another process claims the id, ready to take it from a worker silent
    # for 1 s, while "w" keeps heartbeating
    # Then it is refused
    try:
        with pytest.raises(EdpError, match="in use by another live process"):
            new.claim_worker_id("w", silent_for=1.0)
    finally:
        beating.set()
        beats.join()
    # When "w" falls silent (cut off from the server, which keeps its session)
    old.heartbeat("w", clock=T0, now=old.wall_clock() - 10)
    # Then the claim ends the silent holder's session and takes the id
    new.claim_worker_id("w", silent_for=1.0)
    assert new._member is not None and old._member is not None
    with pytest.raises(EdpError, match="in use by another live process"):
        old.claim_worker_id("w")  # (its own check finds it lost, and taken)


def test_a_database_newer_than_this_edp_is_refused_and_shown_as_newer(pg_url: str) -> None:
    # Given a database that a newer edp migrated (a version this edp does not know)
    open_store(pg_url).close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("INSERT INTO schema_migrations VALUES (99, '0099_future.sql', 0)")
    # When a worker opens it, Then it refuses at once, naming both versions
    with pytest.raises(StoreError,
                       match=rf"schema version 99, newer than this edp .*up to {LATEST}"):
        open_store(pg_url)
    # And `edp db status` says it is newer instead of showing figures
    done = edp_db("status", pg_url)
    assert done.returncode == 0, done.stderr
    assert f"schema version 99 (latest {LATEST})" in done.stdout
    assert "newer than this edp" in done.stdout


def test_another_applications_schema_migrations_is_not_taken_for_edps(pg_url: str) -> None:
    # Given a database of another application with its own schema_migrations (Rails')
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE schema_migrations (version varchar PRIMARY KEY)")
        conn.execute("INSERT INTO schema_migrations VALUES ('20240101120000')")
    # When a worker opens it, Then it refuses, saying why, and creates none of its tables
    with pytest.raises(StoreError, match="has a schema_migrations table but no edp tables"):
        open_store(pg_url)
    # And an operator's command says it holds no edp store
    done = subprocess.run(
        [sys.executable, "-m", "edp", "status", "--database-url", pg_url],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 1
    assert "no edp store in the PostgreSQL database" in done.stderr
    # And edp in a schema of its own, as the message suggests, works beside it
    with psycopg.connect(pg_url, autocommit=True) as conn:
        assert conn.execute("SELECT to_regclass('batches')").fetchone() == (None,)
        conn.execute("CREATE SCHEMA edp")
    separator = "&" if "?" in pg_url else "?"
    open_store(f"{pg_url}{separator}options=-csearch_path%3Dedp").close()
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT to_regclass('edp.batches')").fetchone() != (None,)
        assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone() == (1,)
