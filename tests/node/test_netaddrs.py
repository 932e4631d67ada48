"""Wildcard listen addresses are shown as addresses a peer can dial."""

from node.netaddrs import dialable, interface_ips

PEER = "/p2p/12D3KooWexample"


def test_wildcard_ip4_becomes_one_address_per_interface():
    ips = interface_ips("ip4")
    assert "127.0.0.1" in ips and "0.0.0.0" not in ips
    shown = dialable([f"/ip4/0.0.0.0/tcp/4001{PEER}"])
    assert shown == [f"/ip4/{ip}/tcp/4001{PEER}" for ip in ips]


def test_specific_addresses_are_kept_as_they_are_and_once():
    addrs = [f"/ip4/127.0.0.1/tcp/5{PEER}", f"/ip4/127.0.0.1/tcp/5{PEER}", f"/ip6/::1/tcp/6{PEER}"]
    assert dialable(addrs) == addrs[1:]


def test_wildcard_ip6_leaves_out_link_local():
    shown = dialable([f"/ip6/::/tcp/7{PEER}"])
    assert shown and all("/ip6/::/" not in a and "/ip6/fe80" not in a for a in shown)
