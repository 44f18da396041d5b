"""The Lambda deployment zip of ``deploy/edp.yaml`` (``edp bundle``).

The zip holds edp and its runtime dependencies for one Lambda architecture and
Python version, from binary wheels only (``pip --only-binary=:all:`` with the
Lambda's manylinux platform tags), so it can be built on any machine, e.g. an
x86_64 laptop for ``arm64`` Lambdas. The steps:

1. the requirements: edp's own plus those of the chosen extras (``aws`` and
   ``postgres`` by default, so psycopg's binary build is in), their markers
   evaluated for the target, minus ``boto3`` which the Lambda Python runtime
   already provides (``include_boto3`` bundles it anyway);
2. ``pip download`` of those wheels into a *wheelhouse* (skipped ``offline``),
   then ``pip install --target`` from the wheelhouse alone, so a build uses
   exactly the wheels it holds;
3. edp itself, copied from the installed package, with a small dist-info;
4. a deterministic zip: entries sorted, every timestamp 1980-01-01, every
   mode 0644, no ``__pycache__``/``.pyc``, no console scripts, no
   installer-specific dist-info files (``RECORD``, ``INSTALLER``,
   ``REQUESTED``, ``direct_url.json``).

The same wheels, edp source, options and Python (zlib) give a byte-identical
zip. Known limit of pip: markers of *transitive* dependencies are evaluated
for the Python that runs the build, so build with the target's Python version
when a dependency differs by ``python_version``.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from edp.errors import ConfigError, EdpError

log = logging.getLogger(__name__)

ARCHITECTURES = {"x86_64": "x86_64", "arm64": "aarch64"}
"""Lambda architecture -> the machine name in manylinux platform tags."""

LAMBDA_PYTHON = "3.12"
"""The runtime of the functions in ``deploy/edp.yaml`` (``python3.12``)."""

DEFAULT_EXTRAS = ("aws", "postgres")
PROVIDED_BY_RUNTIME = frozenset({"boto3"})
"""Left out of the zip unless asked for: every Lambda Python runtime ships them."""

LAMBDA_UNZIPPED_LIMIT = 250 * 1024 * 1024
"""AWS's limit on a function's unzipped code."""

ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_FILE_MODE = (stat.S_IFREG | 0o644) << 16
_INSTALLER_FILES = frozenset({"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"})
_PYTHON_VERSION = re.compile(r"^3\.(\d+)$")


@dataclass(frozen=True, kw_only=True)
class BundleOptions:
    """What to build.

    ``wheelhouse`` caches the downloaded wheels (default:
    ``out_dir/wheelhouse/<arch>-cp<version>``); ``offline`` builds from it alone,
    without an index; ``constraints`` is a pip constraints file that pins versions.
    """

    arch: str = "arm64"
    python_version: str = LAMBDA_PYTHON
    extras: tuple[str, ...] = DEFAULT_EXTRAS
    out_dir: Path = Path("dist")
    wheelhouse: Path | None = None
    offline: bool = False
    include_boto3: bool = False
    constraints: Path | None = None

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ConfigError(f"unknown Lambda architecture {self.arch!r}: use x86_64 or arm64")
        if not _PYTHON_VERSION.match(self.python_version):
            raise ConfigError(
                f"Python version {self.python_version!r} is not of the form 3.N (e.g. 3.12)"
            )

    @property
    def zip_name(self) -> str:
        """``edp-lambda-<arch>.zip``."""
        return f"edp-lambda-{self.arch}.zip"

    @property
    def cache_dir(self) -> Path:
        """The wheelhouse in use."""
        if self.wheelhouse is not None:
            return self.wheelhouse
        return self.out_dir / "wheelhouse" / f"{self.arch}-cp{self.python_version.replace('.', '')}"


@dataclass(frozen=True, kw_only=True)
class Bundle:
    """A built zip: where it is, what it holds, and its digests."""

    path: Path
    arch: str
    python_version: str
    size: int
    unzipped_size: int
    files: int
    sha256: str
    packages: tuple[tuple[str, str], ...]
    """(name, version) of every distribution in the zip, edp included, by name."""
    boto3_bundled: bool

    @property
    def code_sha256(self) -> str:
        """The digest as Lambda reports it (``CodeSha256``: base64 of the SHA-256)."""
        return base64.b64encode(bytes.fromhex(self.sha256)).decode("ascii")

    @property
    def version(self) -> str:
        """The version of edp in the zip."""
        return dict(self.packages).get("edp", "0")

    def code_key(self, prefix: str = "edp") -> str:
        """An S3 key that names this build: the same content gives the same key."""
        return f"{prefix.strip('/')}/{self.version}-{self.sha256[:12]}/{self.path.name}"


def glibc_minor(python_version: str) -> int:
    """The glibc (2.N) of the Lambda OS that runs ``python_version``.

    Python 3.11 and older run on Amazon Linux 2 (glibc 2.26), 3.12 and newer on
    Amazon Linux 2023 (glibc 2.34).
    """
    match = _PYTHON_VERSION.match(python_version)
    minor = int(match.group(1)) if match else 12
    return 34 if minor >= 12 else 26


def platform_tags(arch: str, python_version: str) -> list[str]:
    """The manylinux platform tags a Lambda of ``arch`` and ``python_version`` can load.

    pip does not widen ``manylinux_2_N`` to older glibc versions by itself, so
    every version from 2.17 (``manylinux2014``) up to the runtime's is listed.
    """
    machine = ARCHITECTURES[arch]
    newest = glibc_minor(python_version)
    return [f"manylinux2014_{machine}",
            *(f"manylinux_2_{minor}_{machine}" for minor in range(17, newest + 1))]


def target_environment(arch: str, python_version: str) -> dict[str, str]:
    """PEP 508 marker values of the Lambda runtime."""
    return {
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "os_name": "posix",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": ARCHITECTURES[arch],
        "python_version": python_version,
        "python_full_version": f"{python_version}.0",
    }


def requirements(options: BundleOptions) -> list[str]:
    """edp's requirements for the target: its own plus the extras', markers resolved.

    Raises :class:`ConfigError` for an extra edp does not have, or a Python
    version edp does not support.
    """
    try:
        from packaging.requirements import Requirement
        from packaging.specifiers import SpecifierSet
        from packaging.utils import canonicalize_name
    except ImportError:
        raise ConfigError("edp bundle needs `packaging`: run `pip install 'edp[aws]'`") from None
    dist = importlib.metadata.distribution("edp")
    supported = SpecifierSet(",".join(dist.metadata.get_all("Requires-Python") or []))
    if f"{options.python_version}.0" not in supported:
        raise ConfigError(f"edp needs Python {supported}, not {options.python_version}")
    known = {canonicalize_name(e) for e in dist.metadata.get_all("Provides-Extra") or []}
    extras = [canonicalize_name(e) for e in options.extras]
    unknown = sorted(set(extras) - known)
    if unknown:
        raise ConfigError(
            f"edp has no extra {', '.join(unknown)} (it has {', '.join(sorted(known))})"
        )
    skip = set() if options.include_boto3 else set(PROVIDED_BY_RUNTIME)
    environment = target_environment(options.arch, options.python_version)
    chosen: set[str] = set()
    for text in dist.requires or []:
        requirement = Requirement(text)
        marker = requirement.marker
        if marker is not None and not any(
            marker.evaluate({**environment, "extra": extra}) for extra in ("", *extras)
        ):
            continue
        if canonicalize_name(requirement.name) in skip:
            continue
        requirement.marker = None
        chosen.add(str(requirement))
    return sorted(chosen)


def build_bundle(options: BundleOptions) -> Bundle:
    """Build ``out_dir/edp-lambda-<arch>.zip``; see the module docstring.

    Raises :class:`EdpError` when pip fails (no wheel for the platform, no
    network, a wheel missing from the wheelhouse when ``offline``).
    """
    wanted = requirements(options)
    wheelhouse = options.cache_dir
    wheelhouse.mkdir(parents=True, exist_ok=True)
    options.out_dir.mkdir(parents=True, exist_ok=True)
    target = _target_flags(options)
    if not options.offline:
        _pip(["download", "--dest", str(wheelhouse), *target, *wanted],
             what=f"downloading the wheels for Lambda {options.arch}, "
                  f"Python {options.python_version}")
    with tempfile.TemporaryDirectory(prefix="edp-bundle-") as tmp:
        staging = Path(tmp) / "task"
        # --isolated: no pip config or PIP_* variables; the wheelhouse is the only source.
        _pip(["install", "--isolated", "--no-index", "--find-links", str(wheelhouse),
              "--target", str(staging), "--no-compile", *target, *wanted],
             what=f"installing the wheels from {wheelhouse}" + (
                 " (offline: build once without it to download them)" if options.offline else ""))
        _copy_edp(staging, wanted)
        files = bundle_files(staging)
        destination = options.out_dir / options.zip_name
        write_zip(staging, files, destination)
        unzipped = sum((staging / name).stat().st_size for name in files)
        packages = _packages(staging)
    digest = _sha256(destination)
    bundled = any(name == "boto3" for name, _ in packages)
    log.info("built %s (%d files, sha256 %s)", destination, len(files), digest)
    return Bundle(
        path=destination, arch=options.arch, python_version=options.python_version,
        size=destination.stat().st_size, unzipped_size=unzipped, files=len(files),
        sha256=digest, packages=packages, boto3_bundled=bundled,
    )


def bundle_files(root: Path) -> list[str]:
    """The files under ``root`` that go into the zip, as sorted POSIX paths."""
    names = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            name = path.relative_to(root).as_posix()
            if _kept(PurePosixPath(name)):
                names.append(name)
    return sorted(names)


def write_zip(root: Path, names: Sequence[str], destination: Path) -> None:
    """Write ``names`` (relative to ``root``) to a deterministic zip at ``destination``."""
    partial = destination.with_name(destination.name + ".part")
    try:
        with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for name in names:
                info = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
                info.create_system = 3  # Unix, whatever builds it
                info.external_attr = _FILE_MODE
                info.compress_type = zipfile.ZIP_DEFLATED
                archive.writestr(info, (root / name).read_bytes(), compresslevel=6)
        os.replace(partial, destination)
    finally:
        partial.unlink(missing_ok=True)


def _kept(path: PurePosixPath) -> bool:
    parts = path.parts
    if parts[0] == "bin":  # console scripts, with the build machine's interpreter path
        return False
    if "__pycache__" in parts or path.suffix in {".pyc", ".pyo"}:
        return False
    return not (len(parts) == 2 and parts[0].endswith(".dist-info")
                and parts[1] in _INSTALLER_FILES)


def _target_flags(options: BundleOptions) -> list[str]:
    flags = ["--only-binary=:all:", "--implementation", "cp",
             "--python-version", options.python_version,
             "--disable-pip-version-check", "--no-input"]
    for tag in platform_tags(options.arch, options.python_version):
        flags += ["--platform", tag]
    if options.constraints is not None:
        flags += ["--constraint", str(options.constraints)]
    return flags


def _pip(args: Sequence[str], *, what: str) -> None:
    command = [sys.executable, "-m", "pip", *args]
    log.debug("running %s", " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    log.debug("pip said:\n%s%s", result.stdout, result.stderr)
    if result.returncode != 0:
        said = (result.stderr.strip() or result.stdout.strip()).splitlines()[-12:]
        hint = ("" if "No module named pip" not in result.stderr
                else " (this Python has no pip: run `python -m ensurepip`)")
        raise EdpError(f"{what} failed with pip exit status {result.returncode}{hint}:\n"
                       + "\n".join(said))


def _copy_edp(staging: Path, requires: Iterable[str]) -> None:
    """edp's package files (no caches, no hidden files) and a minimal dist-info."""
    import edp

    source = Path(edp.__file__).resolve().parent
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if not path.is_file() or any(p.startswith(".") for p in relative.parts):
            continue
        if not _kept(PurePosixPath("edp", *relative.parts)):
            continue
        destination = staging / "edp" / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, destination)
    version = importlib.metadata.version("edp")
    info = staging / f"edp-{version}.dist-info"
    info.mkdir()
    lines = ["Metadata-Version: 2.1", "Name: edp", f"Version: {version}",
             *(f"Requires-Dist: {r}" for r in requires)]
    (info / "METADATA").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _packages(staging: Path) -> tuple[tuple[str, str], ...]:
    found = []
    for dist in importlib.metadata.distributions(path=[str(staging)]):
        name = re.sub(r"[-_.]+", "-", str(dist.metadata["Name"])).lower()
        found.append((name, str(dist.version)))
    return tuple(sorted(found))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


__all__ = [
    "ARCHITECTURES",
    "DEFAULT_EXTRAS",
    "LAMBDA_PYTHON",
    "Bundle",
    "BundleOptions",
    "build_bundle",
    "bundle_files",
    "platform_tags",
    "requirements",
    "write_zip",
]
