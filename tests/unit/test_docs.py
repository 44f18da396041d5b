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


# -- the reference tables against the code (defaults, per-bucket settings, flags) ------
ROOT = Path(__file__).parents[2]
USER_DOCS = ("README.md", "docs/configuration.md", "docs/local-mode.md", "docs/batching.md",
             "docs/packaging.md", "docs/postgres.md", "docs/aws-runtime.md",
             "docs/deploy-aws.md")
# Defaults the tables describe in words rather than as a value (computed at start, or
# per command): each must still name its setting's row.
DESCRIBED_DEFAULTS = {"database_url", "region", "worker_id", "registry", "workflow",
                      "serve_token"}


def _setting_rows(doc: str) -> Iterator[tuple[str, dict[str, str]]]:
    """(setting, {column: cell}) of each row of each table with a `setting` column."""
    header: list[str] | None = None
    for line in doc.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
        elif "setting" in header and not set(line) <= set("|- "):
            row = dict(zip(header, cells, strict=False))
            yield row["setting"].strip("`"), row


def _shown(value: object) -> set[str]:
    """How a table may show a default value."""
    if value is None:
        return {"unset", "none"}
    if isinstance(value, bool):
        return {f"`{str(value).lower()}`"}
    if isinstance(value, float) and value.is_integer():
        return {f"`{int(value)}`", f"`{value}`"}
    if isinstance(value, tuple):
        return {"empty", "none"} if not value else {f"`{','.join(value)}`"}
    if isinstance(value, dict) and not value:
        return {"`{}`"}
    return {f"`{value}`"}


@pytest.mark.parametrize("page", ["docs/configuration.md", "docs/local-mode.md",
                                  "docs/packaging.md"])
def test_the_settings_tables_show_the_codes_defaults_and_variables(page: str) -> None:
    from edp.config import Settings

    rows = list(_setting_rows((ROOT / page).read_text(encoding="utf-8")))
    assert rows, f"{page} has no settings table"
    wrong = []
    for name, row in rows:
        assert name in SETTING_NAMES, f"{page} documents {name}, which is no setting"
        variable = row.get("environment") or row.get("env var") or ""
        if not variable.startswith(f"`{env_name(name)}`"):
            wrong.append(f"{name}: variable {variable}")
        default = row["default"]
        if name in DESCRIBED_DEFAULTS:
            continue
        if not any(default.startswith(shown) for shown in _shown(
                Settings.model_fields[name].default)):
            wrong.append(f"{name}: default {default}, code {Settings.model_fields[name].default!r}")
    assert wrong == []


def test_the_per_bucket_table_holds_exactly_the_settings_a_bucket_may_override() -> None:
    from edp.config import BucketOverrides

    section = DOC.split("## Grouping", 1)[1].split("\n## ", 1)[0]
    assert [name for name, _ in _setting_rows(section)] == list(BucketOverrides.model_fields)
    assert "## Grouping (SPEC section 2) — overridable per bucket" in DOC
    others = DOC.split("\n## ", 2)[2]  # (every later table: settings no bucket overrides)
    assert not {name for name, _ in _setting_rows(others)} & set(BucketOverrides.model_fields)


def test_the_flags_of_the_grouping_table_are_those_of_the_commands() -> None:
    from edp.cli import main
    from edp.cli._common import GROUPING_FLAGS

    replay = main.commands["replay"]
    flags = {GROUPING_FLAGS[option.name]: option.opts[0] for option in replay.params
             if isinstance(option, click.Option) and option.name in GROUPING_FLAGS}
    section = DOC.split("## Grouping", 1)[1].split("\n## ", 1)[0]
    assert {name: row["flag"].strip("`") for name, row in _setting_rows(section)} == {
        name: flags[name] for name, _ in _setting_rows(section)}


def _edp_command_lines(doc: str) -> Iterator[str]:
    """Each ``edp ...`` command of a page: inline code spans and lines of code blocks
    (with their continuation lines)."""
    import re

    yield from re.findall(r"`(edp [^`]+)`", doc)
    pending, code = "", False
    for line in doc.splitlines():
        code ^= line.startswith("```")
        if not code:
            continue
        text = pending + line.strip()
        pending = text[:-1] + " " if text.endswith("\\") else ""
        if not pending and re.match(r"(\S+=\S+ )*edp ", text):
            yield text.split("  #", 1)[0].split(" | ", 1)[0]


@pytest.mark.parametrize("page", USER_DOCS)
def test_each_edp_command_and_flag_the_docs_show_exists(page: str) -> None:
    import re
    import shlex

    from edp.cli import main

    unknown = []
    commands = [part.strip() for line in _edp_command_lines((ROOT / page).read_text("utf-8"))
                for part in re.split(r"\\?\|", line) if part.strip().startswith("edp ")]
    assert commands, f"{page} shows no edp command"
    for line in commands:
        words = shlex.split(line.replace("'", " ").replace('"', " "))[1:]
        command: click.Command = main
        while isinstance(command, click.Group) and words and words[0] in command.commands:
            command = command.commands[words.pop(0)]
        if isinstance(command, click.Group) and words and re.fullmatch(r"[a-z-]+", words[0]):
            unknown.append(f"{line}: no command {words[0]!r}")
            continue
        known = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)
                 } | {"--help"}
        unknown += [f"{line}: {word}" for word in words
                    if word.startswith("--") and word.split("=")[0] not in known]
    assert unknown == []


def test_the_worked_example_output_table_is_what_the_replay_emits() -> None:
    # (docs/batching.md section 5: the table of batches of tests/replay/lifecycle.jsonl)
    import json

    doc = (ROOT / "docs" / "batching.md").read_text(encoding="utf-8")
    block = doc.split("## 5. A worked example", 1)[1].split("```\n", 2)[1]
    shown = [line.split()[:4] for line in block.splitlines() if line.strip()]
    emitted = [json.loads(line) for line in
               (ROOT / "tests" / "replay" / "lifecycle.expected.jsonl").read_text().splitlines()]
    assert shown == [[e["detail"]["prefix"], e["detail"]["trigger"],
                      str(e["detail"]["object-count"]), e["time"][11:19]] for e in emitted]
    generations = [("(generation 2)" in line) + 1 for line in block.splitlines() if line.strip()]
    assert generations == [e["detail"]["generation"] for e in emitted]


def test_the_error_shown_for_a_bad_value_is_the_one_edp_gives() -> None:
    from edp.config import load_settings
    from edp.errors import ConfigError

    with pytest.raises(ConfigError) as raised:
        load_settings(env={"EDP_BUCKET_PREFIX_DEPTH": "two"}, config_file=None)
    assert f"edp: configuration error: {raised.value}\n" in DOC
