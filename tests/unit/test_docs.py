"""The configuration reference documents every setting, with its environment variable."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from edp.config import OWN_VARIABLES, SETTING_NAMES, env_name

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


def _commands(command: click.Command, path: str) -> Iterator[tuple[str, click.Command]]:
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from _commands(sub, f"{path} {name}")
    else:
        yield path, command


def test_each_flag_that_sets_a_setting_names_it_in_its_help() -> None:
    # (docs/configuration.md: "each command's --help names the setting behind each of
    # its flags")
    from edp.cli import main

    silent = [
        f"{path} {option.opts[0]}"
        for path, command in _commands(main, "edp")
        for option in command.params
        if isinstance(option, click.Option) and option.name in SETTING_NAMES
        and option.name not in (option.help or "")
    ]
    assert silent == []


def test_flags_of_numeric_settings_show_what_they_take_not_text() -> None:
    # (--settle, --port, --max-body showed "TEXT" in --help)
    from edp.cli import main
    from edp.config import Settings

    numeric = {name for name, field in Settings.model_fields.items()
               if isinstance(field.default, int | float) and not isinstance(field.default, bool)}
    shown = {
        f"{path} {option.opts[0]}": option.make_metavar(click.Context(command))
        for path, command in _commands(main, "edp")
        for option in command.params
        if isinstance(option, click.Option) and option.name in numeric
    }
    assert {"edp serve --port", "edp serve --max-body", "edp serve --settle",
            "edp watch --settle"} <= set(shown)
    assert [flag for flag, metavar in shown.items() if metavar == "TEXT"] == []


@pytest.mark.parametrize("name", sorted(OWN_VARIABLES))
def test_edps_own_environment_variables_are_documented(name: str) -> None:
    assert f"`{name}`" in DOC, f"docs/configuration.md does not name {name}"
