"""The packager: one ``package-objects-ready`` event in, one Quilt package revision out.

For a batch (bucket, prefix) :meth:`Packager.package_batch`

1. names the package (:mod:`edp.quilt.names`);
2. lists every file under the prefix: ``s3://bucket/prefix``, or
   ``<package_local_root>/<bucket>/<prefix>`` in local mode, minus what the prefix's
   ``.quiltignore`` (else edp's default list) ignores;
3. reads the metadata file and merges it with the static metadata and the batch
   facts (:mod:`edp.quilt.metadata`);
4. adds the helper files the prefix lacks (:mod:`edp.quilt.helpers`);
5. pushes (S3) or builds (local folder) to the registry (:mod:`edp.quilt.publish`):
   the same content twice makes no new revision.

A workflow validation failure, or a broken (or required but missing) metadata
file, sends the package to ``quarantine_registry`` with the error in its README
and notifies (:mod:`edp.quilt.notify`). Every outcome is a :class:`PackageResult`;
only a programming error raises.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from edp.config import Settings
from edp.core.rules import watch_ignored
from edp.errors import ConfigError, is_unicode
from edp.quilt import helpers as helper_text
from edp.quilt.errors import InvalidRequest, MetadataError, PackagingError, PublishError
from edp.quilt.metadata import check_metadata_size, merge, read_metadata
from edp.quilt.names import check_template, package_name
from edp.quilt.notify import FanOut, Notice, Notifier, build_notifier, catalog_link
from edp.quilt.publish import Published, Registry, WorkflowArg, publish, quilt3, s3_url
from edp.quilt.request import BatchRequest, parse_request

log = logging.getLogger(__name__)


class PackageStatus(StrEnum):
    """The outcome of packaging one batch."""

    PUSHED = "pushed"
    """A new revision is in the registry."""
    UNCHANGED = "unchanged"
    """The latest revision already has this content: nothing written."""
    QUARANTINED = "quarantined"
    """Validation or metadata failed: the package went to the quarantine registry."""
    SKIPPED = "skipped"
    """Nothing to package (no files under the prefix)."""
    FAILED = "failed"
    """No package was written; ``error`` says why, ``retryable`` whether to try again."""


@dataclass(slots=True)
class PackageResult:
    """What happened to one batch. ``as_dict()`` is the JSON line ``edp package`` prints.

    ``registry`` is where the package landed (the quarantine for ``quarantined``) or
    was meant to go; ``files`` counts the files taken from the prefix (helpers not
    included); ``url`` links to the catalog when ``catalog_url`` is set;
    ``notify_errors`` lists notification channels that failed.
    """

    status: PackageStatus
    bucket: str
    prefix: str
    package: str | None = None
    registry: str | None = None
    top_hash: str | None = None
    files: int = 0
    metadata_file: str | None = None
    error: str | None = None
    retryable: bool = False
    url: str | None = None
    batch_id: str | None = None
    event_id: str | None = None
    notify_errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True unless the batch failed (a quarantine is a handled outcome)."""
        return self.status is not PackageStatus.FAILED

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, with the status as text."""
        data = asdict(self)
        data["status"] = self.status.value
        return data


def message_fields(request: BatchRequest, *, name: str, source: str, metadata_file: str,
                   workflow: str) -> dict[str, Any]:
    """The fields of ``package_message`` and the helper files' templates for a batch."""
    return {**request.fields(), "name": name, "source": source,
            "metadata_file": metadata_file, "workflow": workflow}


def message_problem(template: str) -> str | None:
    """Why ``template`` is no usable ``package_message``, or None."""
    try:
        helper_text.check_message(template, message_fields(
            BatchRequest("bucket", "prefix/"), name="user/package", source="s3://bucket/prefix/",
            metadata_file="none", workflow="none"))
    except (ValueError, AttributeError, IndexError, KeyError) as exc:
        return f"is not usable: {exc}; e.g. 'Batch {{batch_id}} of {{source}}'"
    return None


def _caused_by_s3(exc: BaseException) -> bool:
    """Whether ``exc`` was raised while handling an S3 (botocore) error."""
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:  # pragma: no cover (quilt3 needs botocore)
        return False
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, ClientError | BotoCoreError):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


def _never_fits(exc: BaseException) -> bool:
    """Whether ``exc`` says that a name cannot exist on this file system, or cannot be
    a package's logical key (a file name that is not UTF-8): no retry helps, and a
    sink's later events would wait behind the retried one."""
    return (isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG) or isinstance(
        exc, UnicodeError)


class Packager:
    """Turns batches into Quilt packages. Build one per process and reuse it.

    ``registry``, ``workflow``, ``quarantine_registry`` and ``local_root`` override the
    settings of the same names (``registry``, ``workflow``, ``quarantine_registry``,
    ``package_local_root``). Without a registry, a batch goes to its own bucket
    (``s3://<bucket>``; ``<local_root>/<bucket>`` in local mode), as in the original
    EDP. ``workflow=...`` means "the registry's default workflow". ``buckets``, when
    given, are the only buckets whose batches it packages: any other batch fails for
    good, unread (a watcher packages its own folder, not the folders beside it).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        registry: str | None = None,
        workflow: WorkflowArg = None,
        quarantine_registry: str | None = None,
        local_root: str | Path | None = None,
        notifier: Notifier | None = None,
        s3_client: Any = None,
        buckets: Collection[str] | None = None,
    ) -> None:
        check_template(settings.package_name_template)
        problem = message_problem(settings.package_message)
        if problem is not None:
            raise ConfigError(f"package_message {settings.package_message!r} {problem}")
        self.settings = settings
        chosen = registry or settings.registry
        self.registry = Registry.parse(chosen) if chosen else None
        chosen_q = quarantine_registry or settings.quarantine_registry
        self.quarantine = (Registry.parse(chosen_q, what="quarantine_registry") if chosen_q
                           else None)
        name = workflow if workflow is not None else settings.workflow
        self.workflow: WorkflowArg = ... if name is None else name
        root = local_root if local_root is not None else settings.package_local_root
        self.local_root = Path(root).expanduser().resolve() if root else None
        self.notifier: Notifier = notifier if notifier is not None else build_notifier(settings)
        self._s3 = s3_client
        self.buckets = None if buckets is None else frozenset(buckets)

    # -- entry points ---------------------------------------------------------------
    def package(self, message: bytes | str | dict[str, Any], *,
                report_failure: bool = True) -> PackageResult:
        """Package the batch of one input message (any shape :func:`parse_request` takes).

        ``report_failure=False``: a failed outcome is not logged here, because the
        caller reports it itself (a sink's relay, with its attempt and next try; a
        queue's consumer, with what became of the message): one line per try, not one
        per layer."""
        try:
            request = parse_request(message)
        except InvalidRequest as exc:
            if report_failure:
                log.error("not a package-objects-ready event: %s", exc)
            return PackageResult(PackageStatus.FAILED, bucket=exc.bucket, prefix=exc.prefix,
                                 error=str(exc), batch_id=exc.batch_id, event_id=exc.event_id)
        return self.package_batch(request, report_failure=report_failure)

    def package_batch(self, request: BatchRequest, *,
                      report_failure: bool = True) -> PackageResult:
        """Package one batch; see the module docstring for the steps and outcomes, and
        :meth:`package` for ``report_failure``."""
        name = package_name(self.settings.package_name_template, request.bucket, request.prefix)
        result = PackageResult(
            PackageStatus.FAILED, bucket=request.bucket, prefix=request.prefix, package=name,
            batch_id=request.batch_id, event_id=request.event_id,
        )
        if self.buckets is not None and request.bucket not in self.buckets:
            result.error = (f"batch {request.batch_id or '?'} of bucket {request.bucket!r} is "
                            f"not packaged here: this packager serves only "
                            f"{', '.join(map(repr, sorted(self.buckets)))}")
            self._log(result, report_failure)
            return result
        try:
            registry = self._registry_for(request.bucket)
            result.registry = registry.url
            self._run(request, name, registry, result)
        except PackagingError as exc:
            result.status, result.error, result.retryable = (
                PackageStatus.FAILED, str(exc), exc.retryable,
            )
            if not exc.retryable:  # a retry may still succeed: no alarm yet
                self._notify("package-failed", request, result, str(exc))
        except Exception as exc:
            # A case no check foresaw: this batch fails for good (a sink parks it, a queue
            # moves it on), and the packager goes on with the next one.
            log.exception("packaging %s/%s failed unexpectedly", request.bucket, request.prefix)
            result.status, result.retryable = PackageStatus.FAILED, False
            result.error = f"unexpected error: {type(exc).__name__}: {exc}"
            self._notify("package-failed", request, result, result.error)
        self._log(result, report_failure)
        return result

    # -- the steps ------------------------------------------------------------------
    def _run(
        self, request: BatchRequest, name: str, registry: Registry, result: PackageResult
    ) -> None:
        q = quilt3()
        pkg = self._collect(q, request)
        result.files = sum(1 for _ in pkg.walk())
        if result.files == 0:
            result.status = PackageStatus.SKIPPED
            result.error = f"no files under {self._source(request)}"
            return
        problem: str | None = None
        file_meta: dict[str, Any] = {}
        result.metadata_file = next(
            (name for name in self.settings.metadata_files if name in pkg), None
        )
        try:
            file_meta = self._metadata(pkg, request, result.metadata_file)
        except MetadataError as exc:
            problem = str(exc)
        facts = {**request.facts(), "package": name, "metadata-file": result.metadata_file}
        pkg.set_meta(merge(self.settings.package_metadata, file_meta, facts))
        fields = message_fields(request, name=name, source=str(self._source(request)),
                                metadata_file=result.metadata_file or "none",
                                workflow=self._wf_text())
        message = helper_text.fill(self.settings.package_message, fields)
        if problem is None:
            helpers = helper_text.helper_files(
                fields, existing=[k for k, _ in pkg.walk()], metadata_file=result.metadata_file
            )
            try:
                published = self._publish(pkg, name, registry, message, self.workflow, helpers)
            except q.workflows.WorkflowValidationError as exc:
                problem = f"workflow {self._wf_text()} rejected the package: {exc}"
            else:
                result.top_hash = published.top_hash
                result.status = (
                    PackageStatus.PUSHED if published.new_revision else PackageStatus.UNCHANGED
                )
                result.url = catalog_link(self.settings.catalog_url, registry.catalog_bucket, name)
                return
        self._quarantine(pkg, request, name, registry, result, message, fields, problem)

    def _collect(self, q: Any, request: BatchRequest) -> Any:
        source = self._source(request)
        try:
            if isinstance(source, Path) and not source.is_dir():
                self._require_bucket_folder(request)
                return q.Package()  # (its files were all deleted: skipped)
            pkg = q.Package().set_dir(".", str(source) if isinstance(source, Path) else source)
        except q.util.QuiltException as exc:
            # quilt3 refuses what no retry changes: a key it cannot hold (``a//b``, a
            # ``.`` segment). Fail the batch for good (and say so), do not retry forever.
            raise PublishError(f"cannot package {source}: {exc}", retryable=False) from None
        except PublishError:
            raise  # (a missing bucket folder: its message says what to check as it is)
        except Exception as exc:  # S3 or file system errors: retry later  # noqa: BLE001
            raise PublishError(f"cannot list {source}: {type(exc).__name__}: {exc}",
                               retryable=not _never_fits(exc)) from None
        if isinstance(source, Path):
            self._drop_links_out_of(pkg, source)
            # What the watcher never reports (watch_ignore: files still being written
            # under a temporary name, editors' lock files) is no file of the batch.
            for key in [k for k, _ in pkg.walk()
                        if watch_ignored(request.prefix + k, self.settings.watch_ignore)]:
                pkg.delete(key)
        if not request.prefix.strip("/"):
            # A whole bucket (prefix depth 0) holds the registry's own .quilt/ folder
            # when it is its own registry: never package it (it changes with each push).
            for key in [k for k, _ in pkg.walk() if k.startswith(".quilt/")]:
                pkg.delete(key)
        patterns = self._ignore_patterns(pkg, source)
        for key in [k for k, _ in pkg.walk() if helper_text.is_ignored(k, patterns)]:
            pkg.delete(key)
        return pkg

    def _require_bucket_folder(self, request: BatchRequest) -> None:
        """A missing prefix folder means its files were deleted; a missing bucket folder
        (or local root) means a wrong ``package_local_root`` or a drive not mounted:
        retried, as a bucket S3 cannot find is, rather than the batch skipped."""
        folder = None if self.local_root is None else self.local_root / request.bucket
        if folder is not None and not folder.is_dir():
            raise PublishError(
                f"no folder {folder} for bucket {request.bucket!r}: is package_local_root "
                f"({self.local_root}) right, and its drive mounted?", retryable=True)

    @staticmethod
    def _drop_links_out_of(pkg: Any, source: Path) -> None:
        """Leave out files whose real path is outside the prefix (symlinks out of the root),
        and files whose names are not UTF-8 (no package key; the watcher skips them too)."""
        for key, entry in list(pkg.walk()):
            if not is_unicode(key):  # (a name that was not UTF-8: surrogate escapes)
                log.warning("left out %r: its name is not valid UTF-8", key)
                pkg.delete(key)
                continue
            real = Path(entry.physical_key.path).resolve()
            if real != source and source not in real.parents:
                log.warning("left out %s: it links to %s, outside %s", key, real, source)
                pkg.delete(key)

    def _ignore_patterns(self, pkg: Any, source: Path | str) -> list[str]:
        if ".quiltignore" not in pkg:
            return helper_text.parse_quiltignore(helper_text.DEFAULT_QUILTIGNORE)
        try:
            text = pkg[".quiltignore"].get_bytes().decode("utf-8", "replace")
        except Exception as exc:  # noqa: BLE001  (S3 read: retry later)
            raise PublishError(f"cannot read {source}/.quiltignore: {exc}") from None
        return helper_text.parse_quiltignore(text)

    def _metadata(self, pkg: Any, request: BatchRequest, found: str | None) -> dict[str, Any]:
        if found is not None:
            where = f"{self._source(request)}{'' if self.local_root is None else '/'}{found}"
            size = pkg[found].size
            if isinstance(size, int):  # (the listing's size: nothing read yet)
                check_metadata_size(size, where)
            try:
                data = pkg[found].get_bytes()
            except Exception as exc:  # noqa: BLE001  (S3 read: retry later)
                raise PublishError(f"cannot read {where}: {exc}") from None
            return read_metadata(found, data, where=where)
        if self.settings.metadata_required:
            raise MetadataError(
                f"no metadata file in {self._source(request)} (looked for "
                f"{', '.join(self.settings.metadata_files)}; metadata_required is on)"
            )
        log.info("no metadata file: bucket=%s prefix=%s batch_id=%s",
                 request.bucket, request.prefix, request.batch_id)
        return {}

    def _publish(
        self, pkg: Any, name: str, registry: Registry, message: str, workflow: WorkflowArg,
        helpers: list[helper_text.HelperFile],
    ) -> Published:
        q = quilt3()
        try:
            return publish(pkg, name, registry, message=message, workflow=workflow,
                           helpers=helpers, latest=self._latest,
                           pointer_taken=lambda stamp: self._pointer_taken(registry, name, stamp))
        except q.workflows.WorkflowValidationError:
            raise
        except q.util.QuiltException as exc:
            # quilt3 wraps an S3 error while reading the registry's workflow config
            # (throttling, 5xx, a bucket not there yet) in its ConfigurationError: an S3
            # error, which a retry may fix, not a refusal of this package.
            raise PublishError(f"quilt3 refused {name} for {registry}: {exc}",
                               retryable=_caused_by_s3(exc)) from None
        except Exception as exc:  # S3, network, disk: the batch can be tried again  # noqa: BLE001
            # ... unless no retry can change it: a name the file system cannot hold would
            # fail for ever (and a sink's later events wait behind a retried one).
            raise PublishError(
                f"writing {name} to {registry} failed: {type(exc).__name__}: {exc}",
                retryable=not _never_fits(exc),
            ) from None

    def _quarantine(
        self, pkg: Any, request: BatchRequest, name: str, registry: Registry,
        result: PackageResult, message: str, fields: Mapping[str, Any], problem: str,
    ) -> None:
        result.error = problem
        if self.quarantine is None:
            result.status, result.retryable = PackageStatus.FAILED, False
            self._notify("package-failed", request, result, problem)
            return
        readme = helper_text.HelperFile(
            "README.md",
            helper_text.quarantine_readme(fields, registry=registry.url, error=problem).encode(),
        )
        helpers = [readme, *helper_text.helper_files(
            fields, existing=[k for k, _ in pkg.walk()] + ["README.md"],
            metadata_file=result.metadata_file,
        )]
        if "README.md" in pkg:
            pkg.delete("README.md")
        q = quilt3()
        try:
            try:
                published = self._publish(pkg, name, self.quarantine, message, ..., helpers)
            except q.workflows.WorkflowValidationError:
                # The quarantine's own default workflow must not keep the package out.
                published = self._publish(pkg, name, self.quarantine, message, None, helpers)
        except PublishError as exc:
            raise PublishError(f"{problem}; pushing to the quarantine registry "
                               f"{self.quarantine} failed too: {exc}", retryable=exc.retryable
                               ) from None
        result.status, result.top_hash = PackageStatus.QUARANTINED, published.top_hash
        result.registry = self.quarantine.url
        # (a failure, or a failed quarantine, is reported once, with its outcome: see _log)
        log.warning("package %s for bucket=%s prefix=%s batch_id=%s quarantined in %s: %s",
                    name, request.bucket, request.prefix, request.batch_id, self.quarantine,
                    problem)
        result.url = catalog_link(self.settings.catalog_url, self.quarantine.catalog_bucket, name)
        self._notify("package-quarantined", request, result, problem, intended=registry.url)

    # -- helpers --------------------------------------------------------------------
    def _registry_for(self, bucket: str) -> Registry:
        if self.registry is not None:
            return self.registry
        if self.local_root is not None:
            return Registry.parse(str(self._safe(self.local_root, bucket)))
        return Registry.parse(f"s3://{bucket}")

    def _source(self, request: BatchRequest) -> Path | str:
        if self.local_root is None:
            return s3_url(request.bucket, request.prefix)
        if "" in request.prefix.split("/")[:-1]:
            # (a folder path collapses "a//" to "a/": the parent folder, other batches'
            # files; a key prefix on S3 does not)
            raise InvalidRequest(f"detail.prefix {request.prefix!r} has an empty segment: "
                                 f"no folder under the local root (bucket {request.bucket})")
        # The prefix's folder must resolve inside its bucket's folder, not only inside the
        # local root: a prefix folder linked to a sibling of the bucket's folder (another
        # bucket, or the folder beside a watched one) is not this batch's to package.
        bucket_folder = self._safe(self.local_root, request.bucket)
        return self._safe(bucket_folder, request.prefix, what="the folder of bucket")

    @staticmethod
    def _safe(root: Path, *parts: str, what: str = "the local root") -> Path:
        try:
            path = root.joinpath(*parts).resolve()
        except (ValueError, OSError) as exc:
            raise InvalidRequest(f"{'/'.join(parts)!r} is no path under {what} "
                                 f"{root}: {exc}") from None
        if path != root and root not in path.parents:
            raise InvalidRequest(f"{'/'.join(parts)!r} escapes {what} {root}")
        return path

    def _client(self) -> Any:
        if self._s3 is None:
            from edp.aws.clients import client

            self._s3 = client("s3", region=self.settings.region)
        return self._s3

    def _pointer_taken(self, registry: Registry, name: str, stamp: str) -> bool:
        """Whether ``registry`` has a revision pointer ``stamp`` of ``name`` already."""
        try:
            self._client().head_object(Bucket=registry.bucket,
                                       Key=f".quilt/named_packages/{name}/{stamp}")
        except Exception:  # noqa: BLE001  (not there, or unknown: the push goes on)
            return False
        return True

    def _latest(self, registry: Registry, name: str) -> str | None:
        try:
            body = self._client().get_object(
                Bucket=registry.bucket, Key=f".quilt/named_packages/{name}/latest"
            )["Body"].read()
        except Exception:  # noqa: BLE001  (only informative: the push already succeeded)
            log.warning("cannot read the latest revision of %s in %s", name, registry)
            return None
        return str(body.decode().strip()) or None

    def _source_text(self, request: BatchRequest) -> str | None:
        try:
            return str(self._source(request))
        except InvalidRequest:  # (a prefix with no folder: the notice says why)
            return None

    def _wf_text(self) -> str:
        return "(registry default)" if self.workflow is ... else str(self.workflow)

    def _notify(
        self, kind: str, request: BatchRequest, result: PackageResult, error: str,
        *, intended: str | None = None,
    ) -> None:
        if isinstance(self.notifier, FanOut) and not self.notifier.notifiers:
            return
        notice = Notice(
            kind=kind, package=result.package or "-", bucket=request.bucket,
            prefix=request.prefix, registry=intended or result.registry or "-", error=error,
            landed_in=result.registry if kind == "package-quarantined" else None,
            url=result.url, workflow=self._wf_text(), batch_id=request.batch_id,
            event_id=request.event_id, source=self._source_text(request),
        )
        try:
            result.notify_errors += self.notifier.notify(notice)
        except Exception as exc:  # a boundary: the package's outcome stands
            # A notifier must not raise; should one (an odd answer it did not expect),
            # the package or its quarantine is written already: redoing it is worse.
            log.exception("notifying %s for package %s failed", kind, result.package)
            result.notify_errors.append(f"{type(exc).__name__}: {exc}")

    @staticmethod
    def _log(result: PackageResult, report_failure: bool) -> None:
        if not result.ok and not report_failure:
            return  # (the caller says it: see package)
        level = logging.INFO if result.ok else logging.ERROR
        log.log(level, "package %s: status=%s bucket=%s prefix=%s batch_id=%s registry=%s "
                "top_hash=%s error=%s", result.package, result.status.value, result.bucket,
                result.prefix, result.batch_id, result.registry, result.top_hash, result.error)


__all__ = ["PackageResult", "PackageStatus", "Packager"]
