"""The ``edp`` command line: thin commands that parse, wire and call the engine.

Each command family lives in its own module here and registers itself on
:func:`main` when imported below.
"""

from __future__ import annotations

import logging
import sys

import click

from edp.errors import one_line

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class OneLineFormatter(logging.Formatter):
    """Log records whose message is one line: names taken from input (keys, prefixes,
    error texts) cannot forge log lines with line breaks or terminal escapes.
    Tracebacks stay as they are, below the message."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = one_line(record.message)
        return super().formatMessage(record)


@click.group()
@click.version_option(package_name="edp")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv: debug).")
def main(verbose: int) -> None:
    """edp: one event per batch of files, not one per file."""
    level = logging.WARNING - 10 * min(verbose, 2)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter(LOG_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])


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
