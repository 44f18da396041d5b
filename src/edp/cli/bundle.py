"""``edp bundle``: build the Lambda deployment zip and say how to deploy it."""

from __future__ import annotations

from pathlib import Path

import click

from edp.cli import main
from edp.cli._common import handle_errors


@main.command("bundle")
@click.option("--arch", type=click.Choice(["arm64", "x86_64"]), default="arm64",
              show_default=True, help="Lambda architecture (the stack's LambdaArchitecture).")
@click.option("--python", "python_version", default="3.12", show_default=True,
              help="Python version of the Lambda runtime (deploy/edp.yaml runs python3.12).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("dist"), show_default=True, help="Where the zip is written.")
@click.option("--extras", default="aws,postgres", show_default=True,
              help="edp extras whose dependencies go in the zip, comma-separated.")
@click.option("--wheelhouse", type=click.Path(file_okay=False, path_type=Path),
              help="Cache of downloaded wheels [default: OUT/wheelhouse/ARCH-cpVERSION].")
@click.option("--offline", is_flag=True,
              help="Build from the wheelhouse alone, without a package index.")
@click.option("--constraint", "constraints", type=click.Path(dir_okay=False, path_type=Path),
              help="pip constraints file pinning dependency versions.")
@click.option("--include-boto3", is_flag=True,
              help="Bundle boto3 too instead of using the Lambda runtime's.")
@click.option("--s3-bucket", default="ARTIFACTS-BUCKET",
              help="Artifacts bucket to show in the upload command.")
@click.option("--s3-prefix", default="edp", show_default=True,
              help="Key prefix to show in the upload command.")
@handle_errors
def bundle(
    arch: str, python_version: str, out_dir: Path, extras: str, wheelhouse: Path | None,
    offline: bool, constraints: Path | None, include_boto3: bool, s3_bucket: str,
    s3_prefix: str,
) -> None:
    """Build dist/edp-lambda-ARCH.zip, the code of deploy/edp.yaml's Lambdas.

    edp and the dependencies of EXTRAS, as manylinux wheels for ARCH and the
    Python version (binary wheels only, so any machine can build for either
    architecture). The same wheels and source give a byte-identical zip.
    boto3 is left out unless --include-boto3: the Lambda runtime provides it.
    Prints the size, the SHA-256 and the upload command with the
    CloudFormation parameters to use.
    """
    from edp.aws.bundle import LAMBDA_PYTHON, LAMBDA_UNZIPPED_LIMIT, BundleOptions, build_bundle

    options = BundleOptions(
        arch=arch, python_version=python_version, out_dir=out_dir,
        extras=tuple(e.strip() for e in extras.split(",") if e.strip()),
        wheelhouse=wheelhouse, offline=offline, include_boto3=include_boto3,
        constraints=constraints,
    )
    if python_version != LAMBDA_PYTHON:
        click.echo(f"edp: note: deploy/edp.yaml runs python{LAMBDA_PYTHON}; a zip for "
                   f"Python {python_version} needs a function with that runtime.", err=True)
    click.echo(f"building {out_dir / options.zip_name} for Lambda {arch}, Python "
               f"{python_version} (wheels in {options.cache_dir}) ...", err=True)
    built = build_bundle(options)
    mib = built.size / (1 << 20)
    key = built.code_key(s3_prefix)
    click.echo(f"built    {built.path}")
    click.echo(f"size     {built.size} bytes ({mib:.1f} MiB), {built.files} files, "
               f"{built.unzipped_size / (1 << 20):.1f} MiB unzipped")
    click.echo(f"sha256   {built.sha256}")
    click.echo(f"CodeSha256 (as Lambda reports it) {built.code_sha256}")
    click.echo("packages " + ", ".join(f"{name} {version}" for name, version in built.packages))
    if not built.boto3_bundled:
        click.echo("boto3    not bundled: the Lambda runtime provides it (--include-boto3 to pin)")
    if built.unzipped_size > LAMBDA_UNZIPPED_LIMIT:
        click.echo("edp: warning: more than Lambda's 250 MiB of unzipped code", err=True)
    click.echo("")
    click.echo("Upload it (the key names this build, so every new build gets a new key):")
    click.echo(f"  aws s3 cp {built.path} s3://{s3_bucket}/{key}")
    click.echo("and deploy deploy/edp.yaml with these parameter values:")
    click.echo(f"  LambdaCodeBucket={s3_bucket}")
    click.echo(f"  LambdaCodeKey={key}")
    click.echo(f"  LambdaArchitecture={arch}")
