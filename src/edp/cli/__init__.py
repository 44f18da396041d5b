"""The ``edp`` command line: thin commands that parse, wire and call the engine.

Each command family lives in its own module here and registers itself on
:func:`main` when imported below.
"""

from __future__ import annotations

import logging
import sys

import click


@click.group()
@click.version_option(package_name="edp")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv: debug).")
def main(verbose: int) -> None:
    """edp: one event per batch of files, not one per file."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


# Command modules register themselves on `main`; keep one import per family.
from edp.cli import batches as _batches  # noqa: E402
from edp.cli import replay as _replay  # noqa: E402
from edp.cli import store as _store  # noqa: E402

# -- further command modules: one import line each, below this line
# isort: split
from edp.cli import backfill as _backfill  # noqa: E402, F401
from edp.cli import bundle as _bundle  # noqa: E402, F401
from edp.cli import demo as _demo  # noqa: E402, F401
from edp.cli import package as _package  # noqa: E402, F401
from edp.cli import run as _run  # noqa: E402, F401
from edp.cli import serve as _serve  # noqa: E402, F401
from edp.cli import status as _status  # noqa: E402, F401
from edp.cli import watch as _watch  # noqa: E402, F401

__all__ = ["main"]
_ = (_batches, _replay, _store)
