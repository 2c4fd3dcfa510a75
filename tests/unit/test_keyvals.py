"""keyvals: the one key=val,... parser of --port and --net, with QEMU's ',,' for a comma."""

from __future__ import annotations

import pytest

from virtwire.config import parse_port
from virtwire.errors import CliError
from virtwire.guest.nics import parse_nic_spec
from virtwire.keyvals import escape_value, parse_key_values, parse_on_off, split_options
from virtwire.net.options import NET_OPTIONS, SWITCHES, is_unicast_mac, on_off


def test_double_comma_is_a_comma_in_a_value() -> None:
    assert split_options("vhost-user,path=/tmp/a,,b,queues=2") == [
        "vhost-user", "path=/tmp/a,b", "queues=2"]
    assert split_options("a,,,,b") == ["a,,b"]
    assert split_options(escape_value("x,y,,z")) == ["x,y,,z"]
    assert split_options("k=v,") == ["k=v", ""]


def test_port_and_net_share_the_escaping() -> None:
    assert parse_port("vhost-user,path=/tmp/vw,,0.sock,backend=null").path == "/tmp/vw,0.sock"
    spec = parse_nic_spec("vhost-user,socket=/tmp/s,,1,queues=2")
    assert spec.options["socket"] == "/tmp/s,1"


def test_key_values_refuse_bad_parts_with_the_flag_named() -> None:
    assert parse_key_values("--x", ["a=1", "", "b=2=3"], {"a", "b"}) == {"a": "1", "b": "2=3"}
    with pytest.raises(CliError, match="^--x: unknown key 'c'"):
        parse_key_values("--x", ["c=1"], {"a"})
    with pytest.raises(CliError, match="^--x: expected key=value, got 'a'"):
        parse_key_values("--x", ["a"], {"a"})
    with pytest.raises(CliError, match="^--x: key 'a' given twice"):
        parse_key_values("--x", ["a=1", "a=2"], {"a"})


def test_one_on_off_parser() -> None:
    for text, want in (("on", True), ("OFF", False), ("yes", True), ("0", False)):
        assert on_off(text) is want
        assert parse_on_off("--port ", "csum", text) is want
    with pytest.raises(ValueError):
        on_off("maybe")
    with pytest.raises(CliError, match=r"^--net pci,csum=maybe: expected on or off$"):
        parse_on_off("--net pci,", "csum", "maybe")


def test_switches_come_from_the_device_option_table() -> None:
    assert set(NET_OPTIONS) <= set(SWITCHES)
    assert {"packed", "event_idx", "indirect_desc"} <= set(SWITCHES)
    for k in SWITCHES:  # every switch is accepted by both flags
        assert parse_port(f"vhost-user,path=/x,{k}=off").features == {k: False}
        assert parse_nic_spec(f"pci,{k}=off").options == {k: "off"}
        assert parse_nic_spec(f"vhost-user,{k}=on").options == {k: "on"}


def test_one_mac_check() -> None:
    assert is_unicast_mac("52:54:00:12:34:56")
    assert not is_unicast_mac("53:54:00:12:34:56")  # multicast bit
    assert not is_unicast_mac("52:54:00:12:34")
