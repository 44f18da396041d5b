"""The database URL made of a Secrets Manager secret (edp.aws.secrets)."""

from __future__ import annotations

from edp.aws.secrets import url_from_secret


def test_a_secrets_url_requires_tls_off_this_machine_unless_it_says_otherwise() -> None:
    base = {"username": "edp", "password": "pw", "host": "db.internal", "dbname": "edp"}
    assert url_from_secret(base).endswith("/edp?sslmode=require")
    assert url_from_secret({**base, "sslmode": "disable"}).endswith("?sslmode=disable")
    verified = url_from_secret({**base, "sslmode": "verify-full",
                                "sslrootcert": "/var/task/rds-ca.pem"})
    assert verified.endswith("?sslmode=verify-full&sslrootcert=/var/task/rds-ca.pem")
    for host in ("127.0.0.1", "localhost", "::1"):
        assert "?" not in url_from_secret({**base, "host": host}), host
