"""A watcher's packager sink: every failed package of a relay page is reported."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from edp.bootstrap import build_runtime
from edp.config import Settings
from edp.engine import Message
from edp.quilt.packager import PackageResult, PackageStatus
from edp.quilt.sink import PackagerSink
from edp_testing import T0, eventbridge


class FailingPackager:
    """Fails every batch, each for a reason of its own (retryable)."""

    def package(self, message: Any, *, report_failure: bool = True) -> PackageResult:
        detail = json.loads(message)["detail"] if isinstance(message, (str, bytes)) else (
            message["detail"])
        prefix = detail["prefix"]
        return PackageResult(PackageStatus.FAILED, bucket="lab", prefix=prefix,
                             package=f"pkg/{prefix.strip('/')}", retryable=True,
                             error=f"reason-of-{prefix.strip('/').rsplit('/')[-1]}")


def test_each_failed_package_of_a_relay_page_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a watcher's packager sink (failures left to the relay to log, d67360c)
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'edp.db'}", buckets=("lab",),
                        bucket_threshold_event_count=1)
    sink = PackagerSink(FailingPackager(), name="quilt-packager")  # type: ignore[arg-type]
    rt = build_runtime(settings, sinks=[sink])
    # When two batches fire in one step, and both packages fail, each for its own reason
    rt.engine.process([Message(eventbridge(f"{p}/f.txt", T0, bucket="lab"), "watch")
                       for p in ("x/a", "x/b")], now=T0)
    rt.engine.fire_due(now=T0 + 86_400)
    with caplog.at_level(logging.WARNING):
        rt.relay.deliver()
    rt.close()
    # Then each reason is in the log (it was the packager's own line before d67360c; the
    # relay says only the first of a page)
    text = caplog.text
    assert "reason-of-a" in text and "reason-of-b" in text, text
