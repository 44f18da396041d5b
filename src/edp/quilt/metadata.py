"""Package metadata: the metadata file of a prefix, static metadata, batch facts.

The metadata file is the first of the ``metadata_files`` names (default
``metadata.xlsx, metadata.json, metadata.yaml, metadata.csv``) found at the top of
the prefix. Readers:

- ``.xlsx``: the first sheet, one key/value pair per row (column A the key, column B
  the value), as the original EDP example does; rows without a key are skipped;
- ``.csv``: the same, one ``key,value`` row each (UTF-8, a BOM is allowed);
- ``.json``: one JSON object; ``.yaml``/``.yml``: one YAML mapping.

A first row that reads exactly ``key, value`` (any case) is a header and skipped.
Values become JSON-safe (:func:`json_safe`): dates and times as ISO 8601 text,
NaN/infinity as null, anything else unknown as its text.

The package's metadata is ``{**package_metadata (static), **file metadata,
"edp": batch facts}``: the file wins over the static values and the ``edp`` key
always holds the facts of the batch (see :func:`merge`).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
import zipfile
from collections.abc import Iterable, Mapping
from decimal import Decimal
from pathlib import PurePosixPath
from typing import Any

from edp.quilt.errors import MetadataError

FACTS_KEY = "edp"
"""The metadata key that holds the batch facts."""

MAX_METADATA_BYTES = 10 * 1024 * 1024
"""A metadata file larger than this is refused (10 MiB)."""
MAX_XLSX_UNPACKED_BYTES = 100 * 1024 * 1024
"""What an ``.xlsx`` metadata file may unpack to (100 MiB)."""
MAX_PACKAGE_METADATA_BYTES = 900_000
"""Package metadata read from a file, as JSON: quilt3 refuses a manifest record of
1,000,000 bytes or more, and the record also holds edp's facts and the message."""


def json_safe(value: Any) -> Any:
    """``value`` with every part made JSON-serialisable (recursively)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Decimal):
        return json_safe(float(value))
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [json_safe(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _is_header(row: tuple[Any, ...]) -> bool:
    cells = [str(c).strip().lower() if c is not None else "" for c in row[:2]]
    return cells == ["key", "value"]


def _pairs(rows: Iterable[tuple[Any, ...]]) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for index, row in enumerate(rows):
        if not row or (index == 0 and _is_header(row)):
            continue
        key = row[0]
        if key is None or (isinstance(key, str) and not key.strip()):
            continue
        meta[str(key).strip()] = row[1] if len(row) > 1 else None
    return meta


def read_xlsx(data: bytes) -> dict[str, Any]:
    """Key/value rows of the first sheet of an ``.xlsx`` workbook."""
    import openpyxl

    # A workbook is a zip: a few MiB of it may unpack to gigabytes (a zip bomb), and
    # openpyxl reads some parts whole. The sizes its directory declares bound what
    # zipfile unpacks, so they are checked first.
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        unpacked = sum(member.file_size for member in archive.infolist())
    if unpacked > MAX_XLSX_UNPACKED_BYTES:
        raise ValueError(f"the workbook unpacks to {unpacked} bytes; at most "
                         f"{MAX_XLSX_UNPACKED_BYTES} are read")
    workbook = openpyxl.load_workbook(io.BytesIO(data), read_only=True, data_only=True)
    try:
        sheet = workbook[workbook.sheetnames[0]]
        # Read-only mode trusts the sheet's stored <dimension>, which some writers leave
        # stale ("A1"): rows past it would be dropped without a word.
        sheet.reset_dimensions()
        return _pairs(tuple(row) for row in sheet.iter_rows(values_only=True))
    finally:
        workbook.close()


def read_csv(data: bytes) -> dict[str, Any]:
    """Key/value rows of a CSV file."""
    text = data.decode("utf-8-sig")
    return _pairs(tuple(row) for row in csv.reader(io.StringIO(text)))


def read_json(data: bytes) -> dict[str, Any]:
    """One JSON object."""
    value = json.loads(data.decode("utf-8-sig"))
    if not isinstance(value, dict):
        raise ValueError(f"the top level is a {type(value).__name__}, not an object")
    return value


def read_yaml(data: bytes) -> dict[str, Any]:
    """One YAML mapping (safe loader: no arbitrary objects)."""
    import yaml

    class NoAliases(yaml.SafeLoader):
        """Anchors and aliases refused: a few bytes of them can expand to gigabytes, or
        to a structure that refers to itself."""

        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                raise yaml.YAMLError("anchors and aliases (&name, *name) are not allowed")
            return super().compose_node(parent, index)

    value = yaml.load(data.decode("utf-8-sig"), Loader=NoAliases)  # noqa: S506 (a SafeLoader)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"the top level is a {type(value).__name__}, not a mapping")
    return value


READERS = {
    ".xlsx": read_xlsx,
    ".csv": read_csv,
    ".json": read_json,
    ".yaml": read_yaml,
    ".yml": read_yaml,
}


def check_metadata_size(size: int, location: str) -> None:
    """:class:`MetadataError` if a metadata file of ``size`` bytes is over the limit (checked
    before it is read, too: a huge file must not fill the packager's memory)."""
    if size > MAX_METADATA_BYTES:
        raise MetadataError(
            f"metadata file {location} is {size} bytes; the limit is {MAX_METADATA_BYTES}"
        )


def read_metadata(name: str, data: bytes, *, where: str = "") -> dict[str, Any]:
    """Parse a metadata file by its suffix; :class:`MetadataError` if it is broken.

    ``where`` (e.g. ``s3://bucket/prefix/metadata.xlsx``) names the file in errors.
    """
    location = where or name
    suffix = PurePosixPath(name).suffix.lower()
    reader = READERS.get(suffix)
    if reader is None:
        raise MetadataError(
            f"metadata file {location}: no reader for {suffix or 'files without a suffix'!r}; "
            f"use one of {', '.join(sorted(READERS))}"
        )
    check_metadata_size(len(data), location)
    try:
        safe: dict[str, Any] = json_safe(reader(data))
        size = len(json.dumps(safe, ensure_ascii=False, allow_nan=False).encode())
    except Exception as exc:  # an untrusted file: any parser failure means "broken"  # noqa: BLE001
        raise MetadataError(
            f"metadata file {location} cannot be read as {suffix[1:]}: "
            f"{type(exc).__name__}: {exc}"
        ) from None
    if size > MAX_PACKAGE_METADATA_BYTES:
        raise MetadataError(
            f"metadata file {location} makes {size} bytes of package metadata; Quilt keeps "
            f"at most {MAX_PACKAGE_METADATA_BYTES} (a manifest record is at most 1 MB)"
        )
    return safe


def merge(
    static: Mapping[str, Any], from_file: Mapping[str, Any], facts: Mapping[str, Any]
) -> dict[str, Any]:
    """Static metadata, overridden by the file's, with the batch facts under ``edp``."""
    merged: dict[str, Any] = json_safe({**static, **from_file})
    merged[FACTS_KEY] = json_safe(dict(facts))
    return merged


__all__ = [
    "FACTS_KEY",
    "MAX_METADATA_BYTES",
    "MAX_PACKAGE_METADATA_BYTES",
    "READERS",
    "check_metadata_size",
    "json_safe",
    "merge",
    "read_csv",
    "read_json",
    "read_metadata",
    "read_xlsx",
    "read_yaml",
]
