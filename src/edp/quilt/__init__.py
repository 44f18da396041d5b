"""Quilt packaging: batches become packages, new revisions become ``package-ready``.

- :class:`Packager` (``edp package``, the Lambda handler :func:`edp.quilt.handler.package_handler`,
  local mode): one ``package-objects-ready`` event -> one package revision;
  :class:`PackagerSink` delivers the outbox's batch events to it in process.
- :class:`PackageReadyObserver`: an engine observer that emits ``package-ready``
  after a settle delay, with optional File Gateway warm-up.

Nothing here imports quilt3 or boto3 until it is used (the ``quilt`` extra).
"""

from edp.quilt.errors import InvalidRequest, MetadataError, PackagingError, PublishError
from edp.quilt.packager import Packager, PackageResult, PackageStatus
from edp.quilt.ready import PackageReadyObserver, build_package_ready_observer
from edp.quilt.request import BatchRequest, parse_request
from edp.quilt.sink import PackagerSink

__all__ = [
    "BatchRequest",
    "InvalidRequest",
    "MetadataError",
    "PackageReadyObserver",
    "PackageResult",
    "PackageStatus",
    "Packager",
    "PackagerSink",
    "PackagingError",
    "PublishError",
    "build_package_ready_observer",
    "parse_request",
]
