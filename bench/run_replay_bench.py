"""Replay one generated stream through the floor, bytewax, a bare batcher, edp's decoding and edp.

Usage (from the repository root, with the peers' virtualenv, see README.md)::

    bench/.venv/bin/python bench/run_replay_bench.py [--events N] [--seed S]
        [--file PATH] [--skip-edp] [--rss-scaling]

Each peer runs as its own child process, one after the other, on the same
file:

* floor:   ``<python> bench/peer_floor.py FILE``
* bytewax: ``<python> bench/peer_bytewax.py FILE``
* in-memory batcher: ``<python> bench/peer_ceiling.py FILE`` (a yardstick, not a
  product: the same batching rules in one bare loop, nothing persisted)
* edp decoding only: ``<edp's python> bench/peer_edp_decode.py FILE`` (a
  yardstick: the work of edp replay's decoding child alone, which bounds the
  replay's speed from below; run with the python beside ``$EDP_BIN``)
* edp:     ``$EDP_BIN replay FILE > /dev/null``
  (``EDP_BIN`` defaults to this checkout's ``.venv/bin/edp``)

``<python>`` is the interpreter running this script.

Measurements, per child:

* seconds: wall-clock time from spawning the child until it has exited, so it
  includes interpreter start-up and imports.  The file is read once by this
  script beforehand (to count its lines), so every peer reads it from the page
  cache.
* peak RSS: each child is started through GNU time (``/usr/bin/time -f %M``,
  Debian package ``time``), which reports the ``ru_maxrss`` that ``wait4``
  gives for that one child: the child and the descendants it waited for,
  nothing else.  Two simpler methods are wrong here.
  ``getrusage(RUSAGE_CHILDREN)`` reports the maximum over every child this
  process has reaped, so an earlier, larger peer hides a later one.  And the
  kernel carries ``ru_maxrss`` across ``exec``: a child spawned straight from
  this Python process (``subprocess`` uses ``vfork``) reports at least this
  process's own peak RSS, tens of MiB after generating the stream.  GNU time's
  own footprint is about 1.5 MiB, below any peer's.

``--rss-scaling`` instead runs only edp on the first quarter, the first half
and all of the stream (250k, 500k and 1M events by default), to show whether
its peak RSS stays flat as the stream gets longer.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from gen_stream import StreamSpec, generate, positive_int

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_EDP_BIN = str(BENCH_DIR.parent / ".venv" / "bin" / "edp")  # this checkout's
GNU_TIME = "/usr/bin/time"
PEER_SCRIPTS = (
    ("floor", "peer_floor.py"),
    ("bytewax", "peer_bytewax.py"),
    ("in-memory batcher", "peer_ceiling.py"),
)
SCALING_FRACTIONS = (4, 2, 1)  # run on 1/4, 1/2 and all of the stream


@dataclass
class Run:
    """The outcome of one child process."""

    peer: str
    events: int
    seconds: float
    max_rss_kib: int
    exit_code: int
    summary: dict[str, Any] | None

    @property
    def result(self) -> str:
        """Say what the peer reported, or how it failed."""
        if self.exit_code != 0:
            return f"failed (exit {self.exit_code})"
        if self.summary is None:
            return ""
        counts = ("groups", "prefixes")
        return ", ".join(f"{self.summary[k]:,} {k}" for k in counts if k in self.summary)


def measure(peer: str, events: int, cmd: Sequence[str], capture: bool) -> Run:
    """Run ``cmd`` under GNU time; return its wall time, peak RSS and summary.

    With ``capture`` the child's stdout is read and its last line parsed as
    the peer's JSON summary; otherwise stdout goes to ``/dev/null``.
    """
    print(f"running {peer}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    with tempfile.NamedTemporaryFile("r", prefix="edp-bench-", suffix=".rss") as rss:
        timed = [GNU_TIME, "--quiet", "--format=%M", f"--output={rss.name}", *cmd]
        stdout = subprocess.PIPE if capture else subprocess.DEVNULL
        started = time.perf_counter()
        proc = subprocess.run(timed, stdout=stdout, check=False)
        seconds = time.perf_counter() - started
        reported = rss.read().split()
    max_rss_kib = int(reported[-1]) if reported else 0
    summary: dict[str, Any] | None = None
    lines = (proc.stdout or b"").decode().splitlines()
    if proc.returncode == 0 and lines:
        summary = json.loads(lines[-1])
        events = int(summary["events"])
    return Run(peer, events, seconds, max_rss_kib, proc.returncode, summary)


def check_gnu_time() -> str | None:
    """Return why ``GNU_TIME`` cannot be used, or None if it can."""
    try:
        version = subprocess.run(
            [GNU_TIME, "--version"], capture_output=True, text=True, check=False
        )
    except OSError as exc:
        return f"cannot run {GNU_TIME} ({exc}); install GNU time: apt-get install time"
    if "GNU" not in version.stdout + version.stderr:
        return f"{GNU_TIME} is not GNU time; install it: apt-get install time"
    return None


def count_lines(path: Path) -> int:
    """Count the lines of ``path`` (and pull it into the page cache)."""
    lines = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            lines += chunk.count(b"\n")
    return lines


def write_head(src: Path, dst: Path, lines: int) -> None:
    """Copy the first ``lines`` lines of ``src`` to ``dst``."""
    with src.open("rb") as fin, dst.open("wb") as fout:
        fout.writelines(itertools.islice(fin, lines))


def cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo, or the platform's guess."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def memory_gib() -> str:
    """Return total memory from /proc/meminfo in GiB, or ``unknown``."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def package_version(name: str) -> str:
    """Return the installed version of ``name`` for the peers' interpreter."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_info(edp_bin: str | None) -> list[str]:
    """Return Markdown bullet lines describing the machine and the software."""
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"- Date: {now}",
        f"- CPU: {cpu_model()}, {os.cpu_count()} cores; memory {memory_gib()}",
        f"- OS: {platform.system()} {platform.release()}",
        f"- Python (floor, bytewax, in-memory batcher): {platform.python_version()}"
        f" ({sys.executable}); bytewax {package_version('bytewax')},"
        f" orjson {package_version('orjson')}",
    ]
    if edp_bin is not None:
        lines.append(f"- edp: `{edp_bin} replay FILE > /dev/null`")
    return lines


def markdown_table(runs: Sequence[Run], with_result: bool) -> list[str]:
    """Return the runs as a Markdown table."""
    head = ["peer", "events", "seconds", "events/s", "peak RSS (MiB)"]
    if with_result:
        head.append("result")
    rows = [head, ["---"] * len(head)]
    for run in runs:
        rate = run.events / run.seconds if run.seconds > 0 else 0.0
        row = [
            run.peer,
            f"{run.events:,}",
            f"{run.seconds:.2f}",
            f"{rate:,.0f}",
            f"{run.max_rss_kib / 1024:.1f}",
        ]
        if with_result:
            row.append(run.result)
        rows.append(row)
    return ["| " + " | ".join(row) + " |" for row in rows]


def stream_description(path: Path, events: int, gen_summary: dict[str, object] | None) -> str:
    """Describe the stream in one Markdown bullet."""
    size_mb = path.stat().st_size / 2**20
    text = f"- Stream: `{path.name}`, {events:,} events, {size_mb:.0f} MiB"
    if gen_summary is not None:
        text += (
            f", {gen_summary['prefixes']:,} prefixes, event times"
            f" {gen_summary['first_time']} .. {gen_summary['last_time']}"
        )
    return text


def expected_batches(gen_summary: dict[str, object]) -> list[str]:
    """Explain the batch counts the generator predicts for the stream."""
    event_time = gen_summary["batches_event_time"]
    assert isinstance(event_time, dict)
    return [
        "- Expected batches with count threshold"
        f" {event_time['count_threshold']} and quiet period"
        f" {event_time['quiet_seconds']} s in event time:"
        f" {event_time['by_count']:,} by count, {event_time['by_quiet']:,} by quiet"
        f" period, {event_time['open_at_end']:,} still open at end of stream.",
        "- Expected groups when the timeout never fires (bytewax `collect`,"
        " whose timeout is wall-clock):"
        f" {gen_summary['batches_without_timeouts']:,}.",
    ]


def compare(path: Path, events: int, edp_bin: str | None) -> list[Run]:
    """Run the peers and (unless ``edp_bin`` is None) edp on ``path``, one after another."""
    runs = [
        measure(peer, events, [sys.executable, str(BENCH_DIR / script), str(path)], True)
        for peer, script in PEER_SCRIPTS
    ]
    if edp_bin is not None:
        edp_python = str(Path(edp_bin).parent / "python")
        runs.append(measure("edp decoding only", events,
                            [edp_python, str(BENCH_DIR / "peer_edp_decode.py"), str(path)],
                            True))
        runs.append(measure("edp", events, [edp_bin, "replay", str(path)], False))
    return runs


def rss_scaling(path: Path, events: int, edp_bin: str) -> list[Run]:
    """Run edp on growing heads of the stream at ``path``."""
    runs = []
    with tempfile.TemporaryDirectory(prefix="edp-bench-") as tmp:
        for fraction in SCALING_FRACTIONS:
            lines = events // fraction
            head = path
            if lines < events:
                head = Path(tmp) / f"head-{lines}.jsonl"
                write_head(path, head, lines)
            runs.append(measure("edp", lines, [edp_bin, "replay", str(head)], False))
    return runs


def main() -> int:
    """Prepare the stream, run the peers and print the Markdown report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--events",
        type=positive_int,
        default=1_000_000,
        help="events to generate (default 1000000; ignored with --file)",
    )
    parser.add_argument("--seed", type=int, default=1, help="generator seed (default 1)")
    parser.add_argument("--file", type=Path, help="reuse this stream instead of generating one")
    parser.add_argument("--skip-edp", action="store_true", help="run only floor and bytewax")
    parser.add_argument(
        "--rss-scaling",
        action="store_true",
        help="run only edp, on 1/4, 1/2 and all of the stream",
    )
    args = parser.parse_args()

    problem = check_gnu_time()
    if problem is not None:
        parser.error(problem)
    edp_bin = None if args.skip_edp else os.environ.get("EDP_BIN", DEFAULT_EDP_BIN)
    if args.rss_scaling and edp_bin is None:
        parser.error("--rss-scaling measures edp; it cannot be combined with --skip-edp")
    if edp_bin is not None and not os.access(edp_bin, os.X_OK):
        parser.error(f"edp not found at {edp_bin}: set EDP_BIN or pass --skip-edp")

    gen_summary = None
    if args.file is not None:
        if not args.file.is_file():
            parser.error(f"no such file: {args.file}")
        path = args.file
    else:
        path = BENCH_DIR / f"stream-{args.events}-seed{args.seed}.jsonl"
        print(f"generating {path}", file=sys.stderr, flush=True)
        gen_summary = generate(path, StreamSpec(events=args.events, seed=args.seed))
    events = count_lines(path)

    report = ["## Replay benchmark", "", *machine_info(edp_bin)]
    report.append(stream_description(path, events, gen_summary))
    if args.rss_scaling:
        assert edp_bin is not None
        runs = rss_scaling(path, events, edp_bin)
        report += ["", "### edp peak RSS against stream length", ""]
        report += markdown_table(runs, with_result=False)
    else:
        if gen_summary is not None:
            report += expected_batches(gen_summary)
        runs = compare(path, events, edp_bin)
        report += ["", *markdown_table(runs, with_result=True)]
    report += [
        "",
        "Seconds are wall-clock from spawn to exit of each peer's process (start-up"
        " included); peak RSS is GNU time's `%M` (`ru_maxrss` of that process alone).",
    ]
    print("\n".join(report))
    return 0 if all(run.exit_code == 0 for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
