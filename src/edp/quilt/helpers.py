"""Helper files added to a package: README.md, quilt_summarize.json, .quiltignore.

Each is added only when the prefix has no file of that name. Their text depends on
the batch's facts only (never on the wall clock), so the same event always gives
the same bytes and the same top hash.

Where their bytes live: never under the batch prefix. A pushed package keeps them
under ``.quilt/edp/<package name>/<sha256>/<name>`` in the registry (see
:func:`helper_key`); edp never batches ``.quilt/`` keys, so writing them cannot
start another batch (SPEC section 2), and the prefix keeps only the user's files.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

HELPER_ROOT = ".quilt/edp"

DEFAULT_QUILTIGNORE = """.DS_*
Icon
._*
.TemporaryItems
.Trashes
.VolumeIcon.icns
"""
"""The ``.quiltignore`` added when the prefix has none (the original EDP's list)."""

README_TEMPLATE = """# {name}

Quilt package made by edp (Event-Driven Packaging) from a batch of {files}
at `{source}`.

| | |
|---|---|
| batch | `{batch_id}` |
| trigger | {trigger} |
| first file event | {first_event_time} |
| last file event | {last_event_time} |
| metadata file | {metadata_file} |
| workflow | {workflow} |
"""

QUARANTINE_TEMPLATE = """# {name} (quarantined)

edp could not push this package to `{registry}`:

```
{error}
```

It was pushed here instead, so that nothing is lost. Fix the metadata (or the
workflow) at `{source}` and upload again; edp will make a new package.

| | |
|---|---|
| batch | `{batch_id}` |
| trigger | {trigger} |
| metadata file | {metadata_file} |
| workflow | {workflow} |
"""


@dataclass(frozen=True, slots=True)
class HelperFile:
    """A generated file: its logical key and bytes."""

    logical_key: str
    body: bytes

    @property
    def digest(self) -> str:
        """SHA-256 of the body, hex."""
        return hashlib.sha256(self.body).hexdigest()


def helper_key(package: str, helper: HelperFile) -> str:
    """The registry key where a helper file's bytes are kept (content-addressed)."""
    return f"{HELPER_ROOT}/{package}/{helper.digest}/{helper.logical_key}"


def fill(template: str, fields: Mapping[str, Any]) -> str:
    """``template.format_map(fields)``, where a missing field renders as ``-``."""
    return template.format_map(_Defaults(fields))


def check_message(template: str, fields: Mapping[str, Any]) -> None:
    """Raise ValueError unless ``template`` names only ``fields`` (plain names: no
    positional, attribute or index fields) and renders with them: a misspelt field
    would otherwise render as ``-`` in every commit message."""
    for _, name, _, _ in string.Formatter().parse(template):
        if name is not None and name not in fields:
            raise ValueError(f"{{{name}}} is not a field (fields: {', '.join(fields)})")
    fill(template, fields)


def readme(facts: Mapping[str, Any]) -> str:
    """The README.md of a package, from the batch facts."""
    return fill(README_TEMPLATE, facts)


def quarantine_readme(facts: Mapping[str, Any], *, registry: str, error: str) -> str:
    """The README.md of a quarantined package: what failed, and the facts."""
    return fill(QUARANTINE_TEMPLATE, {**facts, "registry": registry, "error": error})


def summarize(metadata_file: str | None) -> str:
    """quilt_summarize.json: show the metadata file in the catalog, if there is one."""
    return json.dumps([metadata_file] if metadata_file else [])


def helper_files(
    facts: Mapping[str, Any], *, existing: Iterable[str], metadata_file: str | None
) -> list[HelperFile]:
    """The helper files the prefix does not have already (``existing`` logical keys)."""
    present = set(existing)
    candidates = {
        "README.md": readme(facts),
        "quilt_summarize.json": summarize(metadata_file),
        ".quiltignore": DEFAULT_QUILTIGNORE,
    }
    return [
        HelperFile(key, text.encode())
        for key, text in candidates.items()
        if key not in present
    ]


def parse_quiltignore(text: str) -> list[str]:
    """The patterns of a ``.quiltignore`` file (blank lines and ``#`` comments dropped)."""
    return [
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
    ]


def is_ignored(logical_key: str, patterns: Sequence[str]) -> bool:
    """Whether a ``.quiltignore`` pattern matches the key, or one of its folders.

    As in ``quilt3`` (and git): a pattern matches a path at any depth
    (``.DS_*`` ignores ``a/.DS_Store``); a pattern matching a folder ignores all below it.
    """
    parts = logical_key.split("/")
    paths = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        rule = pattern.rstrip("/")
        folder_only = pattern.endswith("/")
        for depth, path in enumerate(paths):
            is_file = depth == len(paths) - 1
            if folder_only and is_file:
                continue
            if fnmatch.fnmatchcase(path, rule) or fnmatch.fnmatchcase(path, "*/" + rule):
                return True
    return False


class _Defaults(dict[str, Any]):
    """A format map that renders a missing fact as ``-``."""

    def __missing__(self, key: str) -> str:
        return "-"


__all__ = ["DEFAULT_QUILTIGNORE", "HELPER_ROOT", "HelperFile", "fill", "helper_files", "helper_key",
           "is_ignored", "parse_quiltignore", "quarantine_readme", "readme", "summarize"]
