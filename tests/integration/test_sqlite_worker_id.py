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
