"""``edp bundle`` builds the Lambda zip for the production target, reproducibly.

The production target is arm64 / Python 3.12 (deploy/edp.yaml's defaults), built
here on an x86_64 machine with another Python: only binary wheels of the target
platform can be in it. The first build downloads into the session's
wheelhouse; the second runs the CLI offline (no index) from that wheelhouse,
into another directory, and must give the same bytes.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from edp.aws.bundle import (
    Bundle,
    BundleOptions,
    build_bundle,
    platform_tags,
    requirements,
)
from edp.errors import ConfigError
from integration.bundle.bundle_testing import wheelhouse

ARCH, PYTHON = "arm64", "3.12"


@pytest.fixture(scope="module")
def arm64_bundle(wheelhouse_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """The production zip, built once for the module (downloads into the wheelhouse)."""
    return build_bundle(BundleOptions(
        arch=ARCH, python_version=PYTHON, out_dir=tmp_path_factory.mktemp("dist-1"),
        wheelhouse=wheelhouse(wheelhouse_root, ARCH, PYTHON),
    ))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_building_twice_gives_the_same_bytes(
    arm64_bundle: Bundle, wheelhouse_root: Path, tmp_path: Path
) -> None:
    # Given a first build, and its wheelhouse
    house = wheelhouse(wheelhouse_root, ARCH, PYTHON)

    # When `edp bundle` builds again, offline from that wheelhouse, elsewhere
    done = subprocess.run(
        [sys.executable, "-m", "edp", "bundle", "--arch", ARCH, "--python", PYTHON,
         "--out", str(tmp_path / "dist-2"), "--wheelhouse", str(house), "--offline",
         "--s3-bucket", "my-artifacts"],
        capture_output=True, text=True, timeout=240, check=False,
    )

    # Then the zip is byte for byte the first one
    assert done.returncode == 0, done.stderr
    second = tmp_path / "dist-2" / "edp-lambda-arm64.zip"
    # (entries first, for a readable failure; a file of src/edp edited between the
    # two builds shows up here too)
    assert entry_differences(arm64_bundle.path, second) == []
    assert second.read_bytes() == arm64_bundle.path.read_bytes()
    # ... and the command told its size, its digest and how to upload and deploy it
    digest = hashlib.sha256(second.read_bytes()).hexdigest()
    key = f"edp/{arm64_bundle.version}-{digest[:12]}/edp-lambda-arm64.zip"
    out = done.stdout
    assert f"sha256   {digest}" in out
    assert re.search(rf"size     {second.stat().st_size} bytes", out)
    assert f"aws s3 cp {second} s3://my-artifacts/{key}" in out
    assert "LambdaCodeBucket=my-artifacts" in out.splitlines()[-3]
    assert out.splitlines()[-2].strip() == f"LambdaCodeKey={key}"
    assert out.splitlines()[-1].strip() == "LambdaArchitecture=arm64"


def entry_differences(first: Path, second: Path) -> list[str]:
    """Names of the entries that are in one zip only or differ in content or metadata."""
    def entries(path: Path) -> dict[str, tuple[object, ...]]:
        with zipfile.ZipFile(path) as archive:
            return {i.filename: (i.CRC, i.file_size, i.date_time, i.external_attr)
                    for i in archive.infolist()}

    a, b = entries(first), entries(second)
    return sorted(name for name in a.keys() | b.keys() if a.get(name) != b.get(name))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_zip_is_normalised(arm64_bundle: Bundle) -> None:
    # Given the production zip
    with zipfile.ZipFile(arm64_bundle.path) as archive:
        entries = archive.infolist()
    names = [entry.filename for entry in entries]

    # Then its entries are sorted, dated 1980-01-01, mode 0644, from "Unix"
    assert names == sorted(names)
    assert {entry.date_time for entry in entries} == {(1980, 1, 1, 0, 0, 0)}
    assert {entry.external_attr >> 16 for entry in entries} == {0o100644}
    assert {entry.create_system for entry in entries} == {3}
    # ... with no byte code, console scripts or installer records
    assert not [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".pyo"))]
    assert not [n for n in names if n.startswith("bin/")]
    assert not [n for n in names if re.search(r"\.dist-info/(RECORD|INSTALLER|REQUESTED|"
                                              r"direct_url\.json)$", n)]
    assert len(names) == arm64_bundle.files


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_zip_holds_edp_and_arm64_binaries_but_not_boto3(arm64_bundle: Bundle) -> None:
    # Given the production zip
    with zipfile.ZipFile(arm64_bundle.path) as archive:
        names = set(archive.namelist())
    packages = dict(arm64_bundle.packages)

    # Then it has the handlers, the migrations and edp's metadata at the top level
    assert {"edp/aws/handlers.py", "edp/aws/secrets.py",
            "edp/store/migrations/postgres/0001_initial.sql"} <= names
    assert f"edp-{packages['edp']}.dist-info/METADATA" in names
    # ... psycopg's binary build and the other compiled modules, for aarch64 and CPython 3.12
    compiled = [n for n in names if n.endswith(".so") and "cpython" in n]
    assert {"psycopg", "psycopg-binary", "psycopg-pool", "pydantic-core", "orjson"} <= set(packages)
    assert compiled
    assert all("cpython-312-aarch64-linux-gnu" in n for n in compiled), compiled
    assert any(n.startswith("psycopg_binary/") for n in compiled)
    # ... and no boto3: the Lambda runtime has it
    assert not arm64_bundle.boto3_bundled
    assert not [n for n in names if n.startswith(("boto3/", "botocore/"))]


def test_requirements_follow_the_extras_and_leave_boto3_to_the_runtime() -> None:
    # Given edp's metadata
    def names(options: BundleOptions) -> set[str]:
        return {re.split(r"[\[<>=!~ ]", r, maxsplit=1)[0].lower() for r in requirements(options)}

    # When the requirements are resolved for the default extras, with and without boto3
    default = names(BundleOptions())
    with_boto3 = names(BundleOptions(include_boto3=True))
    core_only = names(BundleOptions(extras=()))

    # Then the default has the PostgreSQL driver and tenacity but not boto3
    assert {"psycopg", "tenacity", "pydantic", "orjson", "click"} <= default
    assert "boto3" not in default
    assert with_boto3 == default | {"boto3"}
    assert core_only == {"click", "orjson", "pydantic", "rich"}
    # ... and psycopg comes as its binary build (no compiler, no libpq on Lambda)
    assert any(r.startswith("psycopg[") and "binary" in r for r in requirements(BundleOptions()))


def test_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="architecture"):
        BundleOptions(arch="ppc64le")
    with pytest.raises(ConfigError, match=r"3\.N"):
        BundleOptions(python_version="python3")
    with pytest.raises(ConfigError, match="no extra nosuch"):
        requirements(BundleOptions(extras=("aws", "nosuch")))
    with pytest.raises(ConfigError, match=r"edp needs Python >=3\.11, not 3\.9"):
        requirements(BundleOptions(python_version="3.9"))


def test_platform_tags_match_the_lambda_os_of_the_runtime() -> None:
    # Python 3.12 runs on Amazon Linux 2023 (glibc 2.34), 3.11 on Amazon Linux 2 (2.26)
    tags_312 = platform_tags("arm64", "3.12")
    tags_311 = platform_tags("x86_64", "3.11")

    assert tags_312[0] == "manylinux2014_aarch64"
    assert tags_312[-1] == "manylinux_2_34_aarch64"
    assert "manylinux_2_28_aarch64" in tags_312
    assert tags_311[-1] == "manylinux_2_26_x86_64"
    assert all(tag.endswith("_x86_64") for tag in tags_311)


def test_every_option_is_documented() -> None:
    from edp.cli.bundle import bundle

    readme = (Path(__file__).parents[3] / "deploy" / "README.md").read_text(encoding="utf-8")

    for option in (opt for param in bundle.params for opt in param.opts):
        assert f"`{option}" in readme, f"deploy/README.md does not document {option}"
