"""Builders shared by the packaging tests."""

from __future__ import annotations

import datetime as dt
import io
import json
from pathlib import Path
from typing import Any

from edp.config import Settings


def xlsx(rows: list[tuple[Any, ...]]) -> bytes:
    """An .xlsx workbook whose first sheet holds ``rows``."""
    import openpyxl

    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    for row in rows:
        sheet.append(list(row))
    out = io.BytesIO()
    book.save(out)
    return out.getvalue()


METADATA_ROWS: list[tuple[Any, ...]] = [
    ("Author", "EDP"),
    ("ComputerName", "Genome Lab - 1234"),
    ("Date", dt.date(2024, 1, 5)),
    ("Replicates", 3),
]


def batch_event(bucket: str, prefix: str, *, batch_id: str = "batch-1", count: int = 3,
                event_id: str = "3f1c1d4e-0000-5000-8000-000000000001") -> dict[str, Any]:
    """A package-objects-ready envelope as edp emits it (SPEC section 5)."""
    return {
        "version": "0", "id": event_id, "detail-type": "package-objects-ready",
        "source": "com.quiltdata.edp", "account": "000000000000",
        "time": "2024-01-05T10:00:00Z", "region": "us-east-1",
        "resources": [f"arn:aws:s3:::{bucket}"],
        "detail": {"version": "0.1", "bucket": bucket, "prefix": prefix, "object-count": count,
                   "trigger": "count", "batch-id": batch_id,
                   "first-event-time": "2024-01-05T09:59:00Z",
                   "last-event-time": "2024-01-05T09:59:30Z"},
    }


def quilt_settings(**values: Any) -> Settings:
    """Settings without file or environment (in-memory store)."""
    return Settings(**{"database_url": "sqlite:///:memory:", **values})


def put_files(s3: Any, bucket: str, files: dict[str, bytes]) -> None:
    """Upload ``files`` (key -> bytes)."""
    for key, body in files.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)


def s3_revisions(s3: Any, bucket: str, name: str) -> list[str]:
    """The revision pointers (unix-seconds names) of a package in an S3 registry."""
    response = s3.list_objects_v2(Bucket=bucket, Prefix=f".quilt/named_packages/{name}/")
    keys = [obj["Key"].rsplit("/", 1)[1] for obj in response.get("Contents", [])]
    return sorted(k for k in keys if k != "latest")


def local_revisions(root: Path, name: str) -> list[str]:
    """The revision pointers of a package in a local registry."""
    folder = root / ".quilt" / "named_packages" / name
    return sorted(p.name for p in folder.iterdir() if p.name != "latest") if folder.is_dir() else []


def workflow_config(schema_url: str) -> str:
    """A workflows config.yml with one workflow, ``strict``, checking metadata."""
    return (
        "version: \"1\"\n"
        "is_workflow_required: false\n"
        "workflows:\n"
        "  strict:\n"
        "    name: Strict\n"
        "    metadata_schema: needs-project\n"
        "schemas:\n"
        "  needs-project:\n"
        f"    url: {schema_url}\n"
    )


SCHEMA = json.dumps({
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "required": ["ProjectID"],
    "properties": {"ProjectID": {"type": "string", "pattern": "^[A-Z]{3}$"}},
})
"""Metadata must hold a three-letter ProjectID (METADATA_ROWS has none)."""
