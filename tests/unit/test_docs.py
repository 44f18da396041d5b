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


def test_the_output_event_shown_in_the_batching_doc_is_what_the_replay_emits() -> None:
    # (docs/batching.md section 6 shows lab/e1/'s event of the worked example, whose
    # stream and expected output are tests/replay/lifecycle.*)
    import json

    root = Path(__file__).parents[2]
    doc = (root / "docs" / "batching.md").read_text(encoding="utf-8")
    shown = doc.split("## 6. The output event", 1)[1].split("```json", 1)[1].split("```", 1)[0]
    expected = (root / "tests" / "replay" / "lifecycle.expected.jsonl").read_text()
    assert json.loads(shown) == json.loads(expected.splitlines()[0])
