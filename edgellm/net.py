"""The one network question two commands ask: is an address only reachable from this machine?"""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """``serve`` and ``worker`` listen beyond this machine only when told to; this tells them apart."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
