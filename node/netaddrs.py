"""Dialable forms of the node's listen addresses.

A node that listens on ``/ip4/0.0.0.0/tcp/4001`` is reachable on every
interface, but ``0.0.0.0`` is not an address a peer can dial: an operator who
copies it into another node's ``bootstrap`` list gets nothing. The banner and
``mtor-node status`` therefore show one address per interface instead
(``ifaddr`` already comes with zeroconf, which mDNS uses).
"""

from __future__ import annotations

import ipaddress

import ifaddr

WILDCARDS = {"ip4": "0.0.0.0", "ip6": "::"}


def interface_ips(family: str) -> list[str]:
    """Addresses of this machine's interfaces for ``ip4`` or ``ip6``, loopback first, link-local left out."""
    found: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if family == "ip4" and isinstance(ip.ip, str):
                found.append(ip.ip)
            elif family == "ip6" and isinstance(ip.ip, tuple) and not ipaddress.ip_address(ip.ip[0]).is_link_local:
                found.append(ip.ip[0])
    return sorted(set(found), key=lambda a: (not ipaddress.ip_address(a).is_loopback, a))


def dialable(addrs: list[str]) -> list[str]:
    """``addrs`` with each wildcard address replaced by one address per interface, order kept."""
    out: list[str] = []
    for addr in addrs:
        parts = addr.split("/")
        if len(parts) > 2 and parts[1] in WILDCARDS and parts[2] == WILDCARDS[parts[1]]:
            for ip in interface_ips(parts[1]) or [parts[2]]:
                out.append("/".join(parts[:2] + [ip] + parts[3:]))
        else:
            out.append(addr)
    return list(dict.fromkeys(out))
