"""Fixtures of the packaging tests: quilt3 with its own HOME, a moto server, buckets.

quilt3 and moto are the ``quilt`` and ``dev`` extras: without them these tests
skip locally and fail in CI (``CI`` set).
"""

from __future__ import annotations

import importlib
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edp_testing import missing, moto_server


def need(module: str) -> Any:
    """Import ``module``, or skip (fail in CI) with a clear reason."""
    try:
        return importlib.import_module(module)
    except ImportError:
        missing(f"{module} is not installed: pip install -e '.[quilt,dev]'")


@pytest.fixture(scope="package", autouse=True)
def quilt_env() -> Iterator[Path]:
    """A private HOME (quilt3 keeps its config and cache there) and fake AWS credentials."""
    with tempfile.TemporaryDirectory(prefix="edp-quilt-home-") as home, \
            pytest.MonkeyPatch.context() as mp:
        for name, value in {
            "HOME": home,
            "XDG_DATA_HOME": f"{home}/.local/share",
            "XDG_CACHE_HOME": f"{home}/.cache",
            "XDG_CONFIG_HOME": f"{home}/.config",
            "QUILT_DISABLE_USAGE_METRICS": "true",
            "QUILT_MINIMIZE_STDOUT": "true",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
        }.items():
            mp.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "EDP_CONFIG"):
            mp.delenv(name, raising=False)
        yield Path(home)


@pytest.fixture(scope="package")
def moto_url(quilt_env: Path) -> Iterator[str]:
    """A moto server on 127.0.0.1 for S3, SNS and SQS; ``AWS_ENDPOINT_URL`` points at it."""
    need("quilt3")
    with moto_server() as url, pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL", url)
        yield url


@pytest.fixture
def aws(moto_url: str) -> Callable[[str], Any]:
    """boto3 clients for the moto server: ``aws("s3")``."""
    import boto3

    return lambda service: boto3.client(service, region_name="us-east-1", endpoint_url=moto_url)


@pytest.fixture
def make_bucket(aws: Callable[[str], Any]) -> Callable[[str], str]:
    """Create a bucket with a unique name (``make_bucket("src")`` -> ``src-1a2b3c4d``)."""

    def make(stem: str) -> str:
        name = f"{stem}-{uuid.uuid4().hex[:8]}"
        aws("s3").create_bucket(Bucket=name)
        return name

    return make


@pytest.fixture
def quilt(quilt_env: Path) -> Any:
    """The quilt3 module (skips, or fails in CI, when not installed)."""
    return need("quilt3")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """quilt3 calls a deprecated importlib.resources function; warnings are errors here."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.filterwarnings(
                r"ignore:.* is deprecated. Use files\(\) instead:DeprecationWarning"
            ))
