"""Fixtures of the ``edp bundle`` tests.

Wheels are downloaded once per session into a temporary wheelhouse that every
build shares (pip's own HTTP cache makes later sessions quick as well). The
handler tests run the built zip the way Lambda does: unpacked into a "task"
directory, boto3 in a separate "runtime" directory (Lambda's /var/task and
/var/runtime), imported by a Python from a fresh virtual environment that has
no edp, against a moto server and, for PostgreSQL, a database of their own
(``integration.postgres.pg_testing``).

A missing service (PostgreSQL, moto) fails under ``CI`` and skips otherwise.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from edp.aws.bundle import Bundle, BundleOptions, build_bundle
from edp_testing import fake_aws_environment, moto_server
from integration.bundle.bundle_testing import LOCAL_PYTHON, REGION, Aws, wheelhouse
from integration.postgres.pg_testing import fresh_database, require_server


# -- building ----------------------------------------------------------------------
@pytest.fixture(scope="session")
def wheelhouse_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Parent of the per-target wheelhouses shared by the session's builds."""
    return tmp_path_factory.mktemp("wheelhouse")


@pytest.fixture(scope="session")
def local_bundle(wheelhouse_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """The zip for this machine (its architecture, this Python), with the default extras."""
    arch = {"x86_64": "x86_64", "aarch64": "arm64"}.get(os.uname().machine)
    if arch is None:
        pytest.skip(f"Lambda has no architecture like this machine's ({os.uname().machine})")
    out = tmp_path_factory.mktemp("dist-local")
    return build_bundle(BundleOptions(
        arch=arch, python_version=LOCAL_PYTHON, out_dir=out,
        wheelhouse=wheelhouse(wheelhouse_root, arch, LOCAL_PYTHON),
    ))


@pytest.fixture(scope="session")
def task_dir(local_bundle: Bundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The zip unpacked, as Lambda does into /var/task."""
    task = tmp_path_factory.mktemp("var-task")
    with zipfile.ZipFile(local_bundle.path) as archive:
        archive.extractall(task)
    return task


@pytest.fixture(scope="session")
def runtime_dir(wheelhouse_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """boto3 alone, as the Lambda Python runtime provides it in /var/runtime."""
    runtime = tmp_path_factory.mktemp("var-runtime")
    house = wheelhouse_root / "runtime-boto3"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "download", "--only-binary=:all:", "--dest", str(house), "boto3"],
                   check=True, timeout=240)
    subprocess.run([*pip, "install", "--isolated", "--no-index", "--find-links", str(house),
                    "--target", str(runtime), "--no-compile", "boto3"], check=True, timeout=240)
    return runtime


@pytest.fixture(scope="session")
def clean_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The interpreter of a new virtual environment with nothing installed."""
    venv = tmp_path_factory.mktemp("clean-venv")
    subprocess.run([sys.executable, "-m", "venv", "--clear", "--without-pip", str(venv)],
                   check=True, timeout=120)
    python = venv / "bin" / "python"
    probe = subprocess.run([str(python), "-c", "import edp"], capture_output=True,
                           env={"PATH": os.environ.get("PATH", "")}, check=False)
    assert probe.returncode != 0, "the clean virtual environment can import edp"
    return python


# -- AWS (moto) ----------------------------------------------------------------------
@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """A moto server for the session: ``http://127.0.0.1:PORT``."""
    with moto_server() as url:
        yield url


@pytest.fixture
def aws_environment(moto_endpoint: str, tmp_path: Path) -> dict[str, str]:
    """AWS variables of a Lambda on the moto server: fake credentials, own HOME."""
    home = tmp_path / "home"
    home.mkdir()
    return fake_aws_environment(moto_endpoint, home, REGION)


@pytest.fixture
def aws(aws_environment: dict[str, str]) -> Aws:
    """Clients of the test itself, on the same moto server."""
    import boto3

    session = boto3.session.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name=REGION
    )
    endpoint = aws_environment["AWS_ENDPOINT_URL"]
    return Aws(
        s3=session.client("s3", endpoint_url=endpoint),
        sqs=session.client("sqs", endpoint_url=endpoint),
        events=session.client("events", endpoint_url=endpoint),
        secrets=session.client("secretsmanager", endpoint_url=endpoint),
    )


# -- databases -----------------------------------------------------------------------
@pytest.fixture(scope="session", params=["postgres", "sqlite"])
def database_kind(request: pytest.FixtureRequest) -> str:
    """The store the handlers use; PostgreSQL is checked before anything is built."""
    if request.param == "postgres":
        require_server()
    return str(request.param)


@pytest.fixture
def pg_database() -> Iterator[dict[str, Any]]:
    """A database of our own: the fields of an RDS secret (plus ``url``); dropped after."""
    require_server()
    with fresh_database("bundle") as url:
        parts = urlsplit(url)
        yield {
            "engine": "postgres", "username": parts.username or "postgres",
            # Trust authentication ignores it; it is here because a real secret has one.
            "password": parts.password or "not-used-with-trust-auth",
            "host": parts.hostname or "127.0.0.1", "port": parts.port or 5432,
            "dbname": parts.path.lstrip("/"), "url": url,
        }
