"""Writing a built package to a registry: ``push`` to S3, ``build`` to a local folder.

Both keep the helper files out of the batch prefix (see :mod:`edp.quilt.helpers`)
and make the same content twice a no-op:

- S3 (``s3://bucket``): ``push(name, registry, dest=..., force=True, dedupe=True)``;
  quilt3 returns the package unchanged when the top hash equals the latest one.
- local folder (``file:///dir`` or a path): ``build(name, registry)``. A local build
  always writes a new revision pointer, so when the new top hash equals the previous
  latest one, the pointer the build just wrote is removed again.

quilt3 is imported lazily (it is the ``quilt`` extra); its progress output is kept
off stdout, which belongs to the command's results.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import quote, urlsplit
from urllib.request import url2pathname

from edp.errors import ConfigError
from edp.quilt.helpers import HelperFile, helper_key

log = logging.getLogger(__name__)

WorkflowArg = Any
"""``...`` (the registry's default workflow), ``None`` (none) or a workflow name."""


def quilt3() -> ModuleType:
    """Import quilt3, with its usage metrics and progress bars off unless asked for."""
    os.environ.setdefault("QUILT_DISABLE_USAGE_METRICS", "true")
    os.environ.setdefault("QUILT_MINIMIZE_STDOUT", "true")
    try:
        import quilt3 as imported
    except ImportError:
        raise ConfigError(
            "packaging needs quilt3, which is not installed: run `pip install 'edp[quilt]'`"
        ) from None
    module: ModuleType = imported
    return module


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Keep quilt3's prints off stdout (they go to the debug log).

    ``redirect_stdout`` swaps ``sys.stdout`` process-wide: another thread printing
    meanwhile would be captured too. Packaging runs in one thread per process.
    """
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        yield
    if buffer.getvalue().strip():
        log.debug("quilt3: %s", buffer.getvalue().strip())


def s3_url(bucket: str, key: str = "") -> str:
    """An ``s3://`` URL quilt3 parses back to exactly (bucket, key)."""
    return f"s3://{bucket}/{quote(key, safe='/')}"


def registry_problem(value: str) -> str | None:
    """Why ``value`` is no registry (``s3://bucket``, ``file:///dir`` or a path), or None."""
    parts = urlsplit(value)
    if parts.scheme == "s3":
        if not parts.netloc or parts.path.strip("/"):
            return "must be s3://BUCKET (no key)"
    elif parts.scheme == "file":
        if parts.netloc not in {"", "localhost"}:
            return "is no local folder: file URLs have no host (file:///DIR)"
    elif parts.scheme and len(parts.scheme) != 1:  # (one letter: a path such as C:\...)
        return "must be s3://BUCKET, file:///DIR or a path"
    return None


@dataclass(frozen=True, slots=True)
class Registry:
    """Where packages go: an S3 bucket or a local folder."""

    url: str
    bucket: str | None = None
    root: Path | None = None

    @classmethod
    def parse(cls, value: str, *, what: str = "registry") -> Registry:
        """``s3://bucket``, ``file:///dir`` or a path; :class:`ConfigError` otherwise
        (naming the setting ``what``)."""
        problem = registry_problem(value)
        if problem is not None:
            raise ConfigError(f"{what} {value!r} {problem}")
        parts = urlsplit(value)
        if parts.scheme == "s3":
            return cls(url=f"s3://{parts.netloc}", bucket=parts.netloc)
        if parts.scheme == "file":
            root = Path(url2pathname(parts.path))
        else:  # a path (or C:\...)
            root = Path(value).expanduser()
        root = root.resolve()
        return cls(url=root.as_uri(), root=root)

    @property
    def is_local(self) -> bool:
        """A local folder registry."""
        return self.root is not None

    @property
    def catalog_bucket(self) -> str | None:
        """The bucket part of catalog links (None for a local registry: no catalog
        shows a folder)."""
        return self.bucket

    def __str__(self) -> str:
        return self.url


@dataclass(frozen=True, slots=True)
class Published:
    """What a push/build did."""

    top_hash: str | None
    new_revision: bool


def publish(
    pkg: Any,
    name: str,
    registry: Registry,
    *,
    message: str,
    workflow: WorkflowArg,
    helpers: Sequence[HelperFile],
    latest: Any,
    pointer_taken: Callable[[str], bool] | None = None,
) -> Published:
    """Add ``helpers`` to ``pkg`` and write it to ``registry`` (see the module doc).

    ``latest(registry, name)`` reads the latest top hash (None if no revision).
    ``pointer_taken(stamp)`` says whether an S3 registry has a revision pointer of
    ``name`` named ``stamp`` already (see :func:`wait_for_free_pointer`).
    Raises whatever quilt3 raises (``WorkflowValidationError`` among others).
    """
    try:
        if registry.root is not None:
            return _build_local(pkg, name, registry.root, message=message, workflow=workflow,
                                helpers=helpers)
        assert registry.bucket is not None
        if pointer_taken is not None:
            wait_for_free_pointer(pointer_taken)
        return _push_s3(pkg, name, registry.bucket, message=message, workflow=workflow,
                        helpers=helpers, latest=latest)
    except BaseException:
        # Leave the package as it was, so it can go elsewhere (the quarantine).
        for helper in helpers:
            if helper.logical_key in pkg:
                pkg.delete(helper.logical_key)
        raise


def wait_for_free_pointer(taken: Callable[[str], bool], *, tries: int = 3) -> None:
    """Wait until the current second names no revision pointer of the package yet.

    quilt3 names a revision's pointer after the second it was written in: a second
    revision written in the same second (batches of one prefix firing together, as at
    a watcher's start) overwrote the first's pointer, and that revision disappeared
    from the package's history (and got no ``package-ready``)."""
    for _ in range(tries):
        now = time.time()
        if not taken(str(int(now))):
            return
        time.sleep(int(now) + 1 - now + 0.001)


def outside(bucket: str) -> Any:
    """quilt3's selector: copy only what is not in the registry bucket already.

    Files of the registry bucket are referenced where they are (the default of
    quilt3 >= 6.4, stated for older ones): copying them elsewhere in the same bucket
    would create objects, and S3 events, for content that did not change.
    """

    def select(_logical_key: str, entry: Any) -> bool:
        return bool(entry.physical_key.bucket != bucket)

    return select


def _push_s3(
    pkg: Any, name: str, bucket: str, *, message: str, workflow: WorkflowArg,
    helpers: Sequence[HelperFile], latest: Any,
) -> Published:
    keys = {h.logical_key: helper_key(name, h) for h in helpers}

    def dest(logical_key: str, _entry: Any) -> str:
        # quilt3 would copy a local helper file to <bucket>/<name>/<key>, which is the
        # batch prefix itself when the name mirrors it: a new batch for the prefix.
        return s3_url(bucket, keys.get(logical_key) or f"{name}/{logical_key}")

    with tempfile.TemporaryDirectory(prefix="edp-helpers-") as tmp:
        for helper in helpers:
            path = Path(tmp) / helper.digest / helper.logical_key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(helper.body)
            pkg.set(helper.logical_key, str(path))
        with quiet():
            pushed = pkg.push(
                name, registry=f"s3://{bucket}", dest=dest, message=message, workflow=workflow,
                selector_fn=outside(bucket), force=True, dedupe=True,
            )
    if pushed is pkg:  # quilt3's dedupe: same top hash as the latest revision
        return Published(latest(Registry(url=f"s3://{bucket}", bucket=bucket), name), False)
    return Published(str(pushed.top_hash), True)


OBJECTS = ".quilt/edp/objects"
"""Where a local registry keeps its copies of packaged files, by SHA-256."""


def keep_copies(pkg: Any, root: Path) -> dict[str, Any]:
    """Point every local file of ``pkg`` at a copy inside the registry folder ``root``
    (``<root>/.quilt/edp/objects/<sha256>``, content-addressed: the same content is
    kept once, and a copy never changes). A revision must not change, nor lose files,
    when its source folder does; on S3 a push copies files, and files already in the
    registry bucket are kept by S3's versions, which a folder does not have. Files of
    the registry's own ``.quilt/`` folder (helper files, earlier copies) stay.
    Returns the entries it replaced, by logical key.

    A copy made for a build that then fails stays (another build may share it by
    then; the same content is found again next time)."""
    objects = root / OBJECTS
    internal = root / ".quilt"
    replaced: dict[str, Any] = {}
    for key, entry in list(pkg.walk()):
        if not entry.physical_key.is_local():
            continue
        path = Path(entry.physical_key.path)
        if internal in path.resolve().parents:
            continue  # (the registry's own: a helper file, an earlier copy)
        replaced[key] = entry
        pkg.set(key, str(_copy_into(path, objects)), meta=entry.meta)
    return replaced


def _copy_into(path: Path, objects: Path) -> Path:
    """A read-only copy of ``path`` named by its SHA-256 under ``objects`` (made now,
    or there already: then the file is only read once, to hash it)."""
    digest = hashlib.sha256()
    with path.open("rb") as src:
        while chunk := src.read(1 << 20):
            digest.update(chunk)
    target = objects / digest.hexdigest()[:2] / digest.hexdigest()
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".copy-", delete=False) as tmp:
        try:
            copied = hashlib.sha256()
            with path.open("rb") as src:
                while chunk := src.read(1 << 20):
                    copied.update(chunk)
                    tmp.write(chunk)
        except BaseException:
            Path(tmp.name).unlink(missing_ok=True)
            raise
    if copied.hexdigest() != digest.hexdigest():
        # The file changed between the two reads (still being written): keep what was
        # copied, under its own name.
        target = objects / copied.hexdigest()[:2] / copied.hexdigest()
        target.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(tmp.name, 0o444)
    os.replace(tmp.name, target)
    return target


def _build_local(
    pkg: Any, name: str, root: Path, *, message: str, workflow: WorkflowArg,
    helpers: Sequence[HelperFile],
) -> Published:
    replaced = keep_copies(pkg, root)
    try:
        return _build_copied(pkg, name, root, message=message, workflow=workflow,
                             helpers=helpers)
    except BaseException:
        for key, entry in replaced.items():  # (it may go elsewhere now: the quarantine)
            pkg.set(key, entry)
        raise


def _build_copied(
    pkg: Any, name: str, root: Path, *, message: str, workflow: WorkflowArg,
    helpers: Sequence[HelperFile],
) -> Published:
    for helper in helpers:
        path = root / helper_key(name, helper)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.write_bytes(helper.body)
        pkg.set(helper.logical_key, str(path))
    pointers = root / ".quilt" / "named_packages" / name
    wait_for_free_pointer(lambda stamp: (pointers / stamp).exists())
    before = read_local_latest(root, name)
    existing = set(os.listdir(pointers)) if pointers.is_dir() else set()
    with quiet():
        top_hash = str(pkg.build(name, registry=root.as_uri(), message=message, workflow=workflow))
    if top_hash != before:
        return Published(top_hash, True)
    for pointer in set(os.listdir(pointers)) - existing - {"latest"}:
        (pointers / pointer).unlink(missing_ok=True)
    return Published(top_hash, False)


def read_local_latest(root: Path, name: str) -> str | None:
    """The latest top hash of ``name`` in a local registry, or None."""
    path = root / ".quilt" / "named_packages" / name / "latest"
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


__all__ = ["Published", "Registry", "publish", "quiet", "quilt3", "read_local_latest",
           "registry_problem", "s3_url"]
