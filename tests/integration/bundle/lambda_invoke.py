"""Invoke one Lambda handler as the Python runtime does; run by the tests in a clean venv.

Usage: ``python -P lambda_invoke.py MODULE.FUNCTION EVENT.json``. Imports the
handler by name (from PYTHONPATH, i.e. the unpacked zip), calls it with the
event and a context object, and prints one JSON line: the handler's result (or
its error) and the files the key modules were imported from.
"""

from __future__ import annotations

import importlib
import json
import sys
import uuid
from pathlib import Path
from typing import Any

MODULES = ("edp", "psycopg", "psycopg_binary", "pydantic_core", "orjson", "boto3")


class Context:
    """The attributes of a Lambda context object that code commonly reads."""

    function_name = "edp-test"
    function_version = "$LATEST"
    memory_limit_in_mb = 512
    aws_request_id = str(uuid.uuid4())

    @staticmethod
    def get_remaining_time_in_millis() -> int:
        return 60_000


def main() -> None:
    name, event_file = sys.argv[1], sys.argv[2]
    module_name, _, function_name = name.rpartition(".")
    handler = getattr(importlib.import_module(module_name), function_name)
    event = json.loads(Path(event_file).read_text(encoding="utf-8"))
    outcome: dict[str, Any] = {}
    try:
        outcome["result"] = handler(event, Context())
    except Exception as exc:  # reported to the test, as Lambda reports it
        outcome["error"] = f"{type(exc).__name__}: {exc}"
    outcome["modules"] = {
        module: getattr(sys.modules.get(module), "__file__", None) for module in MODULES
    }
    pq = sys.modules.get("psycopg.pq")
    outcome["psycopg_impl"] = getattr(pq, "__impl__", None)
    print(json.dumps(outcome))


if __name__ == "__main__":
    main()
