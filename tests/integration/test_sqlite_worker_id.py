"""Worker ids on SQLite: one live process per id on one database (as on PostgreSQL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from edp.errors import EdpError
from edp.store.sqlite import SqliteStore

HOLDER = """
import sys
from edp.store.sqlite import SqliteStore
store = SqliteStore(sys.argv[1])
store.claim_worker_id("w")
print("held", flush=True)
sys.stdin.read()
"""


@pytest.mark.timeout(60)
def test_a_worker_id_is_one_live_processs_on_a_sqlite_database(tmp_path: Path) -> None:
    path = str(tmp_path / "edp.db")
    # Given a process holding worker id "w" on a database
    with subprocess.Popen([sys.executable, "-c", HOLDER, path], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as holder:
        _claims_while(holder, path)


def _claims_while(holder: subprocess.Popen[str], path: str) -> None:
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        store = SqliteStore(path)
        try:
            # When another process claims it, Then it is refused, saying what to do
            with pytest.raises(EdpError, match="'w' is in use by another live process"):
                store.claim_worker_id("w")
            # while another id is free, and claiming it again is fine
            store.claim_worker_id("v")
            store.claim_worker_id("v")
            # When the holder is killed, Then its id is free at once (a restart)
            os.kill(holder.pid, signal.SIGKILL)
            holder.wait(timeout=10)
            store.claim_worker_id("w")
        finally:
            store.close()
        # And a closed store's ids are free again
        again = SqliteStore(path)
        try:
            again.claim_worker_id("v")
        finally:
            again.close()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(timeout=10)


def test_an_in_memory_store_claims_nothing() -> None:
    first, second = SqliteStore(":memory:"), SqliteStore(":memory:")
    first.claim_worker_id("w")
    second.claim_worker_id("w")  # (two separate databases)
    first.close()
    second.close()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
def test_the_lock_file_takes_the_databases_permissions(tmp_path: Path) -> None:
    # Given a group-writable database (a store shared by a lab's users), made by a
    # process whose umask gives group read only
    path = tmp_path / "edp.db"
    old = os.umask(0o022)
    try:
        SqliteStore(str(path)).close()
        path.chmod(0o664)
        # When a worker claims its id
        store = SqliteStore(str(path))
        try:
            store.claim_worker_id("w")
        finally:
            store.close()
    finally:
        os.umask(old)
    # Then the lock file beside it is group-writable too (another user's process can
    # lock it, so its worker ids are checked as well)
    assert (tmp_path / "edp.db.workers").stat().st_mode & 0o777 == 0o664


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", [["watch", "{folder}"], ["serve", "--port", "0"]])
def test_a_daemon_refused_its_worker_id_stops_naming_only_options_it_has(
    tmp_path: Path, command: list[str]
) -> None:
    import re

    pytest.importorskip("watchfiles")
    path = str(tmp_path / "edp.db")
    folder = tmp_path / "lab"
    folder.mkdir()
    args = [part.format(folder=folder) for part in command]
    env = {**os.environ, "EDP_WORKER_ID": "w", "HOME": str(tmp_path)}
    # Given a process holding worker id "w" on a database
    with subprocess.Popen([sys.executable, "-c", HOLDER, path], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as holder:
        try:
            assert holder.stdout is not None and holder.stdout.readline() == "held\n"
            # When a daemon without a --worker-id option starts under the same id
            refused = subprocess.run(
                [sys.executable, "-m", "edp", *args, "--database-url", f"sqlite:///{path}"],
                capture_output=True, text=True, env=env, timeout=30, check=False)
        finally:
            holder.kill()
            holder.wait(timeout=10)
    # Then it stops (`edp serve` kept serving without its engine: /ingest answered 503
    # forever), with a one-line error and no traceback
    assert refused.returncode == 1, refused.stderr
    assert "edp: error: worker id 'w' is in use by another live process" in refused.stderr
    assert "Traceback" not in refused.stderr
    # And every option it suggests is one the command takes, or is said to be another's
    assert "EDP_WORKER_ID" in refused.stderr
    helped = subprocess.run([sys.executable, "-m", "edp", command[0], "--help"],
                            capture_output=True, text=True, check=True).stdout
    for option in re.findall(r"(?<![\w-])--[a-z][a-z-]*", refused.stderr):
        assert option in helped or f"{option} option of edp run" in refused.stderr, (
            f"{option} suggested to `edp {command[0]}`")
