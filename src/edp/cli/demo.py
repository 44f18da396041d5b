"""``edp demo``: a self-contained tour of edp in under a minute."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console

from edp.cli import main
from edp.cli._common import handle_errors


@main.command()
@click.option("--keep", type=click.Path(file_okay=False, path_type=Path),
              help="Work in this folder (new or empty) and keep it (watched folder, edp.db, "
                   "events.jsonl, registry) instead of a temporary one.")
@click.option("--no-package", is_flag=True, help="Skip building Quilt packages.")
@handle_errors
def demo(keep: Path | None, no_package: bool) -> None:
    """Watch a temporary folder while a simulated instrument writes two experiments.

    One batch fires by count (5 files), the other by quiet period (3 s); a live view
    shows them filling up, then the events and (with the quilt extra) the packages
    built in a local registry. Uses its own temporary store and config; touches
    nothing else.
    """
    from edp.cli.watch import require_watchfiles
    from edp.demo import run_demo

    require_watchfiles()
    if keep is not None and keep.is_dir() and any(keep.iterdir()):
        # A second run in the same folder would mix its store, events and registry
        # with the first one's: a fresh folder each time.
        raise click.UsageError(f"--keep {keep}: the folder is not empty (a demo keeps its "
                               "store, events and registry there); give a new or empty one")
    if not run_demo(Console(), keep=keep, package=not no_package):
        sys.exit(1)
