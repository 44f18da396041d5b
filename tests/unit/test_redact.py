"""Secrets in URLs never reach logs, errors or ``edp config``."""

from __future__ import annotations

import pytest

from edp.redact import redact_endpoint, redact_text, redact_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://edp:s3cret@db:5432/edp", "postgresql://edp:***@db:5432/edp"),
        ("https://hooks.example/in?token=abc&x=1", "https://hooks.example/in?token=***&x=***"),
        ("https://user:pw@hooks.example/p#frag", "https://user:***@hooks.example/p"),
        ("sqlite:////tmp/edp.db", "sqlite:////tmp/edp.db"),
        ("https://hooks.example/plain", "https://hooks.example/plain"),
        ("https://t0k3n@hooks.example/in", "https://***@hooks.example/in"),
        # a token, then an "@" later in the URL: never shown as a user name
        ("https://s3cret@host:443/x?who=a@b", "https://***@b"),
        ("https://s3cret@host/x?t=10:00&c=a@b", "https://***@b"),
        # a file path holds no user
        ("sqlite:////tmp/a@sign.db", "sqlite:////tmp/a@sign.db"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_libpq_parameters_without_secrets_stay_readable() -> None:
    assert (redact_text("postgresql://u@h/db?sslmode=require&connect_timeout=5&password=pw")
            == "postgresql://***@h/db?sslmode=require&connect_timeout=5&password=***")


def test_redact_text_finds_urls_inside_messages() -> None:
    text = "cannot reach postgresql://a:b@h/db (timeout); retry https://x/y?key=k"
    assert redact_text(text) == "cannot reach postgresql://a:***@h/db (timeout); retry https://x/y?key=***"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://hooks.slack.example/services/T0/B0/S3CRET", "https://hooks.slack.example/..."),
        ("http://127.0.0.1:8080/", "http://127.0.0.1:8080"),
        ("https://user:pw@h.example:444/p?q=1", "https://h.example:444/..."),
        # Without a scheme: the host as written ('://?/...' told the user nothing).
        ("example.com/hook/S3CRET", "example.com/..."),
        ("user:pw@example.com:8080/hook", "example.com:8080/..."),
    ],
)
def test_an_endpoint_shows_only_scheme_and_host(url: str, shown: str) -> None:
    assert redact_endpoint(url) == shown


def test_a_keyword_connection_string_hides_its_password() -> None:
    text = "cannot open host=db user=edp password=s3cret dbname=edp; or password = 'a b'"
    assert redact_text(text) == (
        "cannot open host=db user=edp password=*** dbname=edp; or password = ***")


@pytest.mark.parametrize("password", ["Sup3r#secretpw", "Sup3r?secretpw", 'ab"secretpw',
                                      "ab'secretpw", "ab/secretpw", "ab@secretpw"])
def test_a_password_with_url_delimiters_or_quotes_is_hidden(password: str) -> None:
    # (libpq takes such passwords unencoded; urlsplit would end the user part early)
    url = f"postgresql://postgres:{password}@127.0.0.1:5432/db"
    assert redact_url(url) == "postgresql://postgres:***@127.0.0.1:5432/db"
    for text in (f"cannot open {url}: refused", f"database_url {url!r} is bad",
                 f'database_url "{url}".'):
        assert "secretpw" not in redact_text(text)
        assert "127.0.0.1:5432/db" in redact_text(text)


def test_log_lines_from_the_cli_stay_one_line_whatever_the_input_holds() -> None:
    # Given the CLI's logging, and a record holding text taken from input (a prefix with
    # a line break that imitates a log line, and a terminal escape)
    import subprocess
    import sys

    forged = "x\n2026-01-01 00:00:00,000 INFO edp: FORGED\x1b[2J"
    code = ("import logging\nfrom edp.cli import main\n"
            "main(['-v', 'config'], standalone_mode=False)\n"
            f"logging.getLogger('edp.test').warning('prefix=%s', {forged!r})\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=False)
    # Then the record is one line, its break and escape written out
    lines = [line for line in result.stderr.splitlines() if "edp.test" in line]
    assert len(lines) == 1 and "FORGED" in lines[0] and "\\x0a" in lines[0], result.stderr
    assert not any(line.startswith("2026-01-01") for line in result.stderr.splitlines())
    assert "\x1b" not in result.stderr


@pytest.mark.parametrize("password", ["se cretpw", "p@ss secretpw", "a\tsecretpw", "a/b secretpw"])
def test_a_password_with_spaces_is_hidden(password: str) -> None:
    # (typed unencoded: libpq refuses the URL, and edp's error quotes it; urlsplit and a
    # URL that ends at the first space would show the password's second half)
    url = f"postgresql://edp:{password}@127.0.0.1:5432/db"
    texts = [url]  # (a setting's value, as edp config and the stores show it)
    if "/" not in password:  # (inside a message, a "/" before the "@" ends the user part)
        texts += [f"database_url {url!r} is not a valid libpq URL", f"cannot open {url}: no"]
    for text in texts:
        shown = redact_text(text)
        assert "secretpw" not in shown and "edp:***@127.0.0.1:5432/db" in shown, shown


def test_a_store_error_for_a_password_with_a_space_does_not_show_it() -> None:
    pytest.importorskip("psycopg")
    from edp.errors import EdpError
    from edp.store import open_store

    with pytest.raises(EdpError) as caught:
        open_store("postgresql://edp:se cretpw@127.0.0.1:1/edp")
    assert "cretpw" not in str(caught.value) and "edp:***@" in str(caught.value)


@pytest.mark.parametrize(("text", "shown"), [
    # (a message that begins with a URL is not one URL: its words and the "@" of an
    # address further on are not a password; c3f1932 masked the line up to that "@")
    ("https://host/path?x=1 and user@example.com",
     "https://host/path?x=*** and user@example.com"),
    ("https://hooks.example.com/T0 answered 404 (see admin@example.com)",
     "https://hooks.example.com/T0 answered 404 (see admin@example.com)"),
    ("s3://bucket/prefix/a.csv: Access Denied #3", "s3://bucket/prefix/a.csv: Access Denied #3"),
])
def test_a_message_that_begins_with_a_url_keeps_its_words(text: str, shown: str) -> None:
    assert redact_text(text) == shown


@pytest.mark.parametrize("url", ["https://tok en@hooks.example.com/x",
                                 "postgresql://edp:a/b secretpw@db/edp"])
def test_a_setting_that_is_one_url_is_still_redacted_whole(url: str) -> None:
    shown = redact_text(url)
    assert "en@" not in shown and "secretpw" not in shown and "***@" in shown, shown


@pytest.mark.timeout(20)
def test_a_long_line_is_redacted_in_linear_time() -> None:
    import time

    # (a scheme was tried at every letter of a long word, each try reading to the word's
    # end: a 40 kB token or base64 blob in an error took seconds, 200 kB minutes)
    started = time.perf_counter()
    shown = redact_text("a" * 200_000 + " see https://u:p@h/x")
    assert time.perf_counter() - started < 1.0
    assert shown.endswith("see https://u:***@h/x")
