"""``edp demo``: the whole idea in under a minute, on a laptop, with nothing to set up.

A simulated instrument writes two experiments into a temporary folder that edp
watches as a bucket (the same :class:`~edp.sources.watch.FolderSource`, engine and
daemon as ``edp watch``, on a temporary SQLite store and a config of its own):

* ``microscope/exp-count/``: five images, so the batch fires by **count** (threshold 5);
* ``sequencer/run-quiet/``: three read files and a metadata file, then silence, so
  the batch fires by **quiet period** (3 s).

Each file is written in pieces under a ``.part`` name and renamed when complete,
as instruments and uploaders do. A live view shows the open batches filling up;
then the demo prints the events and, when the ``quilt`` extra is installed, builds
one Quilt package per batch in a local registry.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console, Group
from rich.json import JSON
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from edp.bootstrap import Runtime, build_runtime
from edp.config import Settings
from edp.daemon import Daemon
from edp.errors import EdpError
from edp.sinks import JsonlSink
from edp.sources.watch import FolderSource
from edp.store import Store, open_store

log = logging.getLogger(__name__)

BUCKET = "demo-lab"
EXPECTED = {"microscope/exp-count/": "count", "sequencer/run-quiet/": "duration"}


@dataclass(frozen=True, slots=True)
class Write:
    """One file the instrument writes, ``at`` seconds after the start."""

    at: float
    key: str
    size: int


def plan() -> list[Write]:
    """The instrument's schedule: two experiments, interleaved."""
    writes = [Write(0.5 + 0.6 * i, f"microscope/exp-count/img-{i + 1:03d}.tif", 48_000)
              for i in range(5)]
    writes += [Write(0.8 + 0.7 * i, f"sequencer/run-quiet/reads-{i + 1}.fastq", 24_000)
               for i in range(3)]
    writes.append(Write(2.9, "sequencer/run-quiet/metadata.json", 0))
    return sorted(writes, key=lambda w: w.at)


def demo_settings(database_url: str) -> Settings:
    """The demo's own config: short thresholds; nothing from the user's file or environment."""
    return Settings(
        database_url=database_url,
        bucket_prefix_depth=2,
        bucket_threshold_event_count=5,
        bucket_threshold_duration=3.0,
        watch_settle_seconds=0.4,
        buckets=(BUCKET,),
    )


class Instrument(threading.Thread):
    """Writes :func:`plan` into ``root``: each file in pieces as ``.part``, then renamed."""

    def __init__(self, root: Path) -> None:
        super().__init__(name="edp-demo-instrument", daemon=True)
        self.root = root
        self.log: list[str] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        """Follow the schedule."""
        start = time.monotonic()
        for write in plan():
            if self.stop_event.wait(max(0.0, write.at - (time.monotonic() - start))):
                return
            path = self.root / write.key
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(path.name + ".part")
            body = self._content(write)
            with partial.open("wb") as handle:
                for offset in range(0, len(body), 16_000):
                    handle.write(body[offset : offset + 16_000])
                    handle.flush()
                    time.sleep(0.03)
            partial.rename(path)
            self.log.append(f"{time.monotonic() - start:4.1f}s  wrote {write.key}")

    @staticmethod
    def _content(write: Write) -> bytes:
        if write.key.endswith("metadata.json"):
            return orjson.dumps({"operator": "demo", "instrument": "sequencer-7",
                                 "sample": "S-042"})
        return os.urandom(write.size)


class EngineThread(threading.Thread):
    """Runs the daemon over the folder source; the runtime is built in this thread."""

    def __init__(self, settings: Settings, source: FolderSource, events_file: Path) -> None:
        super().__init__(name="edp-demo-engine", daemon=True)
        self.settings, self.source, self.events_file = settings, source, events_file
        self.worker: Daemon | None = None
        self.ready = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        """Build the runtime, then loop until stopped."""
        runtime: Runtime | None = None
        try:
            runtime = build_runtime(self.settings, sinks=[JsonlSink(self.events_file)],
                                    worker_id="demo")
            self.worker = Daemon(runtime, [self.source], max_wait=0.25)
            self.ready.set()
            self.worker.run()
        except BaseException as exc:  # noqa: BLE001  (reported by the main thread)
            self.error = exc
            self.source.close()
        finally:
            self.ready.set()
            if runtime is not None:
                runtime.close()

    def stop(self) -> None:
        """Finish the current step, flush the outbox, stop."""
        if self.worker is not None:
            self.worker.stop()
        self.join(timeout=30)


def live_view(store: Store, instrument: Instrument, started: float) -> Group:
    """The open batches filling up, the batches fired so far, the instrument's log."""
    now = time.time()
    open_table = Table(title=f"open batches  (t = {time.monotonic() - started:4.1f}s)",
                       expand=True)
    for column in ("prefix", "files", "fill", "fires in", "by"):
        open_table.add_column(column)
    for row in store.list_batches(state="open"):
        bar = "█" * row.object_count + "·" * max(0, 5 - row.object_count)
        open_table.add_row(Text(row.prefix), f"{row.object_count}/5", bar,
                           f"{max(0.0, (row.deadline or now) - now):.1f}s",
                           str(row.deadline_trigger))
    fired = Table(title="fired", expand=True)
    for column in ("prefix", "files", "trigger", "batch id"):
        fired.add_column(column)
    for row in store.list_batches(state="closed"):
        fired.add_row(Text(row.prefix), str(row.object_count), str(row.trigger),
                      row.batch_id[:8])
    writes = Text("\n".join(instrument.log[-6:]) or "instrument starting…", style="dim")
    return Group(open_table, fired, writes)


@contextmanager
def workspace(keep: Path | None) -> Iterator[Path]:
    """A fresh temporary folder (or ``keep``, left in place)."""
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep.resolve()
        return
    with tempfile.TemporaryDirectory(prefix="edp-demo-") as tmp:
        yield Path(tmp)


def run_demo(console: Console, *, keep: Path | None = None, package: bool = True,
             timeout: float = 45.0) -> bool:
    """Run the demo, printing to ``console``; True when both batches fired as expected."""
    with workspace(keep) as work:
        root = work / BUCKET
        root.mkdir(exist_ok=True)
        url = demo_url(work)
        settings = demo_settings(url)
        console.rule("edp demo")
        console.print(f"An instrument writes two experiments into [bold]{escape(str(root))}[/], "
                      "watched as "
                      f"bucket [bold]{BUCKET}[/]. Batches: prefix depth 2, fire at 5 files or "
                      "after 3 s of quiet.\n", highlight=False)
        # (steps of the watcher's own default size: the demo's files come few at a time)
        source = FolderSource.from_settings(root, settings, bucket=BUCKET, chunk=1000)
        engine = EngineThread(settings, source, work / "events.jsonl")
        engine.start()
        engine.ready.wait(timeout=60)
        if engine.error is not None:
            raise engine.error
        store = open_store(url)
        instrument = Instrument(root)
        started = time.monotonic()
        try:
            instrument.start()
            # (output that is not a terminal, a pipe or a file, gets no last frame of
            # the live view, whose open batches are all gone by then, but the whole log)
            with Live(live_view(store, instrument, started), console=console,
                      refresh_per_second=8, transient=not console.is_terminal) as live:
                while time.monotonic() - started < timeout:
                    time.sleep(0.2)
                    live.update(live_view(store, instrument, started))
                    if (not instrument.is_alive() and len(store.list_batches(state="closed"))
                            >= len(EXPECTED) and not store.list_batches(state="open")):
                        break
        finally:
            instrument.stop_event.set()
            engine.stop()
        if not console.is_terminal:
            console.print(Text("\n".join(instrument.log), style="dim"))
        console.print()
        fired = {row.prefix: str(row.trigger) for row in store.list_batches(state="closed")}
        events = [orjson.loads(e.payload) for e in reversed(store.outbox_events(limit=10))]
        store.close()
        show_events(console, events)
        if package:
            show_packages(console, package_events(settings, events, work))
        ok = fired == EXPECTED
        if keep is not None:
            console.print(Text(f"\nKept in {work}: the watched folder, edp.db, events.jsonl"
                               f"{' and the registry' if package else ''}."))
        else:
            console.print("\nThe temporary folder is gone now (edp demo --keep DIR keeps it).")
        console.print(next_steps(work if keep is not None else None), crop=False)
        if not ok:
            console.print(Text(f"expected {EXPECTED}, got {fired}", style="red"))
        return ok


def next_steps(kept: Path | None) -> Group:
    """What to try next. ``edp status`` alone reads the user's own store, which the demo
    never touches (there may be none): with the demo's kept store, the command names
    it, on a line of its own that is never wrapped (to be copied whole); a temporary
    store is gone by now, so only how to keep one is said."""
    text = Text("Next: ")
    text.append("edp watch DIR", style="bold")
    text.append(" for your own folder, ")
    text.append("edp serve --watch DIR", style="bold")
    text.append(" for the dashboard too; ")
    if kept is None:
        text.append("edp demo --keep DIR", style="bold")
        text.append(" keeps the demo's store, for edp status --database-url "
                    "sqlite:///DIR/edp.db.")
        return Group(text)
    text.append("this demo's figures:")
    command = Text(f"  edp status --database-url {demo_url(kept)}", style="bold",
                   no_wrap=True, overflow="ignore")
    return Group(text, command)


def demo_url(work: Path) -> str:
    """The URL of the demo's store in its folder ``work``."""
    return f"sqlite:///{work / 'edp.db'}"


def show_events(console: Console, events: list[dict[str, Any]]) -> None:
    """The package-objects-ready events, as a table and one in full."""
    table = Table(title="package-objects-ready events (also in events.jsonl)")
    for column in ("time", "prefix", "files", "trigger", "id"):
        table.add_column(column)
    for event in events:
        detail = event["detail"]
        table.add_row(event["time"][11:], Text(detail["prefix"]), str(detail["object-count"]),
                      detail["trigger"], event["id"][:8] + "…")
    console.print(table)
    if events:
        console.print(JSON(orjson.dumps(events[0]).decode()))


def package_events(settings: Settings, events: list[dict[str, Any]], work: Path) -> list[Any] | str:
    """Package each batch into a local Quilt registry; or why packaging was skipped."""
    try:
        from edp.quilt.packager import Packager
        from edp.quilt.publish import quilt3
    except ImportError as exc:  # the packager is a separate part of edp
        return f"packaging skipped: the packager is not available ({exc})"
    registry = work / "registry"
    registry.mkdir(exist_ok=True)
    try:
        quilt3()  # (the quilt extra may be missing: say so once, not per batch)
        packager = Packager(settings, registry=str(registry), local_root=work)
        return [packager.package(event) for event in events]
    except EdpError as exc:
        return f"packaging skipped: {exc}"


def show_packages(console: Console, results: list[Any] | str) -> None:
    """The packaging outcomes."""
    if isinstance(results, str):
        console.print(Text(results, style="yellow"))
        return
    table = Table(title="Quilt packages built in the local registry")
    for column in ("package", "status", "files", "top hash"):
        table.add_column(column)
    registries = set()
    for result in results:
        registries.add(str(result.registry))
        table.add_row(Text(str(result.package)), result.status.value, str(result.files),
                      (result.top_hash or result.error or "")[:12])
    console.print(table)
    console.print(Text(f"registry: {', '.join(sorted(registries))}"))


__all__ = ["BUCKET", "EXPECTED", "Instrument", "demo_settings", "demo_url", "next_steps", "plan",
           "run_demo"]
