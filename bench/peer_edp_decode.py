"""The "edp decoding only" yardstick: the work of ``edp replay``'s decoding child alone.

Usage: ``<edp's python> bench/peer_edp_decode.py FILE`` (it imports edp, so it runs
with edp's virtualenv, not the peers').

``edp replay FILE`` runs in two processes: a forked child reads the lines, decodes
them (``edp.engine.decode_messages``: every input format of SPEC section 1, keys
URL-decoded, times parsed, each message checked) and classifies each event (the
core's ``Batcher.classify``); the engine's process batches and stores them. This
peer does the child's work, in chunks of the replay's default size, in one
process, and nothing else (not even the hand-over to the engine, which costs the
child about 0.5 us per event more). A replay cannot finish sooner than this peer
on the same file, however cheap the engine's side becomes::

    {"peer": "edp decoding only", "events": N, "prefixes": P, "seconds": S, ...}

``seconds`` covers reading, decoding and classifying, not interpreter start-up.
"""

from __future__ import annotations

import time
from pathlib import Path

from peer_common import run_peer

from edp.config import Settings
from edp.core.batching import Batcher
from edp.engine import decode_messages
from edp.sources.files import read_chunks


def decode(path: Path) -> tuple[int, set[tuple[str, str]]]:
    """Return the number of events decoded from ``path`` and their (bucket, prefix) pairs."""
    settings = Settings()
    classify = Batcher(settings.rule_book()).classify
    encoded = not settings.eventbridge_raw_keys
    prefixes: set[tuple[str, str]] = set()
    events = 0
    with path.open("rb") as stream:
        for chunk in read_chunks(stream, settings.chunk_size):
            decoded, _ = decode_messages(chunk, now=time.time(), eventbridge_keys_encoded=encoded)
            events += len(decoded)
            for event in decoded:
                prefix = classify(event)
                if type(prefix) is str:
                    prefixes.add((event.bucket, prefix))
    return events, prefixes


def main() -> None:
    """Decode the file named on the command line as edp replay's child does."""

    def work(path: Path) -> tuple[int, dict[str, int]]:
        events, prefixes = decode(path)
        return events, {"prefixes": len(prefixes)}

    run_peer("edp decoding only", __doc__, work)


if __name__ == "__main__":
    main()
