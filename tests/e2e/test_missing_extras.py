"""A command whose extra is not installed says which extra to install (no traceback)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

# What the extras bring (aws, postgres, quilt, web): made unimportable in the child.
EXTRA_MODULES = ("boto3", "botocore", "psycopg", "psycopg_pool", "quilt3", "tenacity",
                 "uvicorn", "starlette", "watchfiles", "openpyxl", "prometheus_client")

RUN_WITHOUT_EXTRAS = (
    "import runpy, sys\n"
    f"for name in {EXTRA_MODULES!r}: sys.modules[name] = None\n"
    "sys.argv = ['edp', *sys.argv[1:]]\n"
    "runpy.run_module('edp', run_name='__main__')\n"
)


@pytest.mark.parametrize(("args", "extra"), [
    (["package", "/dev/null"], "quilt"),
    (["serve", "--port", "0"], "web"),
    (["watch", "{tmp}"], "web"),
    (["run", "--sqs-queue", "https://sqs.us-east-1.amazonaws.com/1/q"], "aws"),
    (["backfill", "s3://bucket"], "aws"),
    (["db", "status", "--database-url", "postgresql://127.0.0.1:9/x"], "postgres"),
])
def test_a_command_without_its_extra_names_the_extra(
    args: list[str], extra: str, tmp_path: Path
) -> None:
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in args]
    done = subprocess.run([sys.executable, "-c", RUN_WITHOUT_EXTRAS, *argv],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    assert f"edp[{extra}" in done.stderr, done.stderr


@pytest.mark.parametrize("args", [["config"], ["replay", "{tmp}/s3.jsonl"]])
def test_packaging_settings_need_no_extra_to_be_checked(args: list[str], tmp_path: Path) -> None:
    # Given a config file shared with the packager (its name template and webhook set)
    # and an installation without any extra (a replay or `edp config` needs none)
    (tmp_path / "edp.toml").write_text(
        'package_name_template = "{0}-{1}/data"\n'
        'notify_webhook_url = "https://hooks.example/in"\n'
        'package_message = "Batch {batch_id}"\nregistry = "s3://lab-packages"\n')
    (tmp_path / "s3.jsonl").write_text("")
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in args]
    # When a command that needs no extra loads it
    done = subprocess.run([sys.executable, "-c", RUN_WITHOUT_EXTRAS, *argv],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    # Then the template is checked without importing the packager's extras
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
