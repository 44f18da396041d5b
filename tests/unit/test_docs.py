"""The configuration reference documents every setting, with its environment variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from edp.config import SETTING_NAMES, env_name

DOC = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("name", SETTING_NAMES)
def test_every_setting_is_documented(name: str) -> None:
    assert f"`{name}`" in DOC, f"docs/configuration.md does not document {name}"
    assert f"`{env_name(name)}`" in DOC, f"docs/configuration.md lacks {env_name(name)}"
