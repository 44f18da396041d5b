"""Network addresses: which ones only this machine can reach."""

from __future__ import annotations

import ipaddress

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` only accepts connections from this machine.

    Only ``localhost`` and loopback IP literals count: a name is not resolved, so a
    name such as ``127.example.com`` is not loopback (it may point anywhere).
    """
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


__all__ = ["LOOPBACK_HOSTS", "is_loopback"]
