"""`edp demo` runs to the end, as a user would run it (own HOME, a subprocess)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_the_demo_runs_to_the_end_and_fires_by_count_and_by_quiet_period(tmp_path: Path) -> None:
    # Given a fresh HOME, no config, and a folder to keep the demo's work in
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "XDG_DATA_HOME": str(home / ".local/share"),
           "QUILT_DISABLE_USAGE_METRICS": "true", "COLUMNS": "120"}
    env.pop("EDP_CONFIG", None)
    work = tmp_path / "work"
    # When the demo runs
    done = subprocess.run([sys.executable, "-m", "edp", "demo", "--keep", str(work)],
                          capture_output=True, env=env, cwd=tmp_path, timeout=120, check=False)
    output = done.stdout.decode()
    # Then it exits 0 after both batches fired, one by count, one by quiet period
    assert done.returncode == 0, output + done.stderr.decode()
    events = [orjson.loads(line) for line in (work / "events.jsonl").read_bytes().splitlines()]
    fired = {e["detail"]["prefix"]: (e["detail"]["trigger"], e["detail"]["object-count"])
             for e in events}
    assert fired == {"microscope/exp-count/": ("count", 5),
                     "sequencer/run-quiet/": ("duration", 4)}
    assert "package-objects-ready" in output
    # And its output, not a terminal, holds every write of the instrument, not the live
    # view's last frame (an empty table of open batches)
    assert output.count(" wrote ") == 9, output
    assert "open batches" not in output
    # And with the quilt extra, each batch became a package in the local registry
    if importlib.util.find_spec("quilt3") is not None:
        named = work / "registry" / ".quilt" / "named_packages"
        assert (named / "microscope" / "exp-count" / "latest").is_file(), output
        assert (named / "sequencer" / "run-quiet" / "latest").is_file(), output
    # And nothing was written to the user's own edp store
    assert not (home / ".local/share/edp").exists()
    # And its last hint, `edp status` on the demo's kept store, works as printed
    [hint] = [line.split() for line in output.splitlines()
              if line.strip().startswith("edp status")]
    assert hint[:3] == ["edp", "status", "--database-url"], output
    status = subprocess.run([sys.executable, "-m", "edp", *hint[1:]], capture_output=True,
                            env=env, cwd=tmp_path, timeout=60, check=False)
    assert status.returncode == 0, status.stderr.decode()
    assert "batches fired" in status.stdout.decode()


def test_the_demos_last_hint_names_no_store_it_does_not_keep() -> None:
    # Given the hint of a demo whose store was temporary (gone when it is printed)
    from rich.console import Console

    from edp.demo import next_steps

    console = Console(width=200, record=True)
    console.print(next_steps(None))
    hint = console.export_text()
    # Then it suggests no bare `edp status` (the user's own store, which may not exist),
    # only how to keep the demo's store for it
    assert "edp status" in hint
    assert hint.count("edp status") == hint.count("edp status --database-url"), hint
    assert "edp demo --keep DIR" in hint


def test_the_demo_refuses_a_keep_folder_that_already_holds_files(tmp_path: Path) -> None:
    # Given a folder that holds an earlier run's store
    work = tmp_path / "work"
    work.mkdir()
    (work / "edp.db").write_bytes(b"earlier run")
    env = {**os.environ, "HOME": str(tmp_path), "QUILT_DISABLE_USAGE_METRICS": "true"}
    # When the demo is asked to keep its work there
    done = subprocess.run([sys.executable, "-m", "edp", "demo", "--keep", str(work)],
                          capture_output=True, env=env, cwd=tmp_path, timeout=60, check=False)
    # Then it refuses before starting, naming the folder, and leaves the file alone
    assert done.returncode == 2, done.stdout.decode() + done.stderr.decode()
    assert f"--keep {work}" in done.stderr.decode()
    assert "not empty" in done.stderr.decode()
    assert (work / "edp.db").read_bytes() == b"earlier run"
    assert sorted(p.name for p in work.iterdir()) == ["edp.db"]
