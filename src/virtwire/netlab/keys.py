"""The netlab keys of ``virtwire serve --port`` and ``virtwire ctl port/set``: one table.

``config.parse_port`` asks ``is_key`` for keys it does not know and hands them to
``parse_port_keys``; ``wire`` and ``control`` build the running settings with ``dir_spec`` /
``port_settings``. Every value is checked here, and a bad one is one line naming the key::

    tx.loss=P%            drop P % of the frames (0-100; "gemodel/p%/r%[/1-h%[/1-k%]]": the
                          Gilbert-Elliott model, netem's ``loss gemodel``)
    tx.delay=TIME         hold every frame this long (50ms, 1.5s, 200us; a unit is required)
    tx.jitter=TIME        +- uniform around the delay (frames may overtake each other)
    tx.reorder=P%         with delay: P % skip it; without: P % swap with the next frame
    tx.duplicate=P%       P % are sent twice
    tx.corrupt=P%         P % get one bit flipped after the Ethernet header
    tx.limit=N            at most N frames held (1-1000000; then back-pressure)
    tx.rate=RATE          bandwidth bucket: RATE (10mbit, 1gbit, 500kbps; 0 or off: none) with
                          a 100 ms bucket
    tx.pps=N              ops bucket: N frames per second (100 ms bucket)
    tx.bw_size=BYTES tx.bw_refill=MS tx.bw_burst=BYTES     the bandwidth bucket, Firecracker's
    tx.ops_size=N    tx.ops_refill=MS tx.ops_burst=N        size / refill_time / one_time_burst
    seed=N                the impairments' random seed (runs repeat exactly)
    shape=on              wrap the port for run-time changes even with no key set yet
    vlan=N                switch port: access port of VLAN N (1-4094); with trunk=: native VLAN
    trunk=N:M:A-B         switch port: 802.1Q trunk of these VLANs (':' separates, '-' ranges)
    uplink_vlan=N uplink_trunk=N:M   the same for the switch's uplink
    uplink=vxlan:VNI@REMOTE          the uplink joins other hosts through a kernel VXLAN device
    uplink_dev=IF         the VXLAN underlay device (default: the route to REMOTE)

``tx`` is what the guest sends, ``rx`` what it receives. Lists are ':'-separated because ','
separates the keys of ``--port``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from virtwire.errors import CliError
from virtwire.netlab.bucket import BucketSpec
from virtwire.netlab.impair import DirSpec, GeModel

__all__ = ["NetlabError", "is_key", "parse_port_keys", "dir_spec", "DIRECTIONS", "DIR_KEYS",
           "PORT_KEYS", "parse_rate", "parse_time", "parse_percent", "parse_vlan_list",
           "parse_vxlan", "Vxlan", "RUNTIME_KEYS", "apply_to_port"]

DIRECTIONS = ("tx", "rx")
RATE_BUCKET_MS = 100.0  # tx.rate= / tx.pps= make buckets that refill over this many ms


class NetlabError(CliError):
    """A bad netlab key or value (one line)."""


def _err(key: str, value: str, what: str) -> NetlabError:
    return NetlabError(f"{key}={value}: {what}")


# -- value parsers -------------------------------------------------------------------------------
_NUM = r"(\d+(?:\.\d*)?|\.\d+)"


def parse_percent(key: str, value: str) -> float:
    """"10%" or "10" -> 0.10; 0..100."""
    m = re.fullmatch(_NUM + r"%?", value.strip())
    if not m:
        raise _err(key, value, "expected a percentage 0-100 (e.g. 10% or 0.5%)")
    p = float(m.group(1))
    if not 0 <= p <= 100:
        raise _err(key, value, "expected a percentage 0-100")
    return p / 100.0


_TIME_UNITS = {"s": 1.0, "sec": 1.0, "ms": 1e-3, "msec": 1e-3, "us": 1e-6, "usec": 1e-6}


def parse_time(key: str, value: str, *, bare: float | None = None, hi: float = 60.0) -> float:
    """"50ms" -> 0.05 s. ``bare``: the unit of a number without one (None: a unit is required)."""
    m = re.fullmatch(_NUM + r"([a-z]*)", value.strip().lower())
    if not m or (m.group(2) and m.group(2) not in _TIME_UNITS):
        raise _err(key, value, "expected a time like 50ms, 1.5s or 200us")
    unit = m.group(2)
    if not unit:
        if bare is None:
            raise _err(key, value, "give a unit (50ms, 1s, 200us)")
        t = float(m.group(1)) * bare
    else:
        t = float(m.group(1)) * _TIME_UNITS[unit]
    if not 0 <= t <= hi:
        raise _err(key, value, f"expected 0 to {hi:g} s")
    return t


_RATE_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
               "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9}


def parse_rate(key: str, value: str) -> float:
    """tc's units: "10mbit" -> 10e6 bit/s ("bps" is bytes per second); "0"/"off" -> 0."""
    v = value.strip().lower()
    if v in ("off", "0"):
        return 0.0
    m = re.fullmatch(_NUM + r"([a-z]*)", v)
    if not m or m.group(2) not in _RATE_UNITS:
        raise _err(key, value, "expected a rate like 10mbit, 1gbit or 500kbps (tc units)")
    bits = float(m.group(1)) * _RATE_UNITS[m.group(2)]
    if not 8 <= bits <= 400e9:
        raise _err(key, value, "expected 8bit to 400gbit")
    return bits


_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_count(key: str, value: str, lo: int, hi: int, *, sizes: bool = False) -> int:
    m = re.fullmatch(r"(\d+)([kmg]?)", value.strip().lower())
    if not m or (m.group(2) and not sizes):
        raise _err(key, value, f"expected a number {lo}-{hi}" + (" (k, M, G: 1024s)"
                                                                   if sizes else ""))
    n = int(m.group(1)) * _SIZE_UNITS[m.group(2)]
    if not lo <= n <= hi:
        raise _err(key, value, f"expected {lo}-{hi}")
    return n


def parse_vlan(key: str, value: str) -> int:
    if not re.fullmatch(r"\d{1,5}", value.strip()) or not 1 <= int(value) <= 4094:
        raise _err(key, value, "a VLAN id is 1-4094")
    return int(value)


def parse_vlan_list(key: str, value: str) -> frozenset[int]:
    """"10:20:30-32" -> {10, 20, 30, 31, 32}."""
    out: set[int] = set()
    for part in value.split(":"):
        lo, sep, hi = part.partition("-")
        try:
            a = parse_vlan(key, lo) if lo else -1
            b = parse_vlan(key, hi) if sep else a
        except NetlabError:
            raise _err(key, value, "VLAN ids are 1-4094") from None
        if a < 0 or b < a:
            raise _err(key, value, "expected VLAN ids 1-4094 like 10:20:30-35")
        out.update(range(a, b + 1))
    return frozenset(out)


@dataclass(frozen=True)
class Vxlan:
    """``uplink=vxlan:VNI@REMOTE``."""

    vni: int
    remote: str

    @property
    def overhead(self) -> int:
        """Outer Ethernet 14 + IP (20 or 40) + UDP 8 + VXLAN 8 bytes."""
        return 50 if ipaddress.ip_address(self.remote).version == 4 else 70


def parse_vxlan(key: str, value: str) -> Vxlan | None:
    """``vxlan:VNI@REMOTE`` -> Vxlan; any other uplink value (a TAP name) -> None."""
    if not value.startswith("vxlan:"):
        return None
    m = re.fullmatch(r"vxlan:(\d{1,8})@([0-9A-Fa-f.:]+)", value)
    if not m:
        raise _err(key, value, "expected vxlan:VNI@REMOTE_IP")
    vni = int(m.group(1))
    if not 1 <= vni <= (1 << 24) - 1:
        raise _err(key, value, "a VXLAN VNI is 1-16777215")
    try:
        remote = str(ipaddress.ip_address(m.group(2)))
    except ValueError:
        raise _err(key, value, "REMOTE is not an IP address") from None
    return Vxlan(vni, remote)


def _ifname(key: str, value: str) -> str:
    if not value or len(value.encode()) > 15 or any(c in value for c in "/: \t"):
        raise _err(key, value, "1-15 characters, no '/', ':' or spaces")
    return value


def _on_off(key: str, value: str) -> bool:
    v = value.lower()
    if v in ("on", "yes", "true", "1"):
        return True
    if v in ("off", "no", "false", "0"):
        return False
    raise _err(key, value, "expected on or off")


def _loss(key: str, value: str) -> float | GeModel:
    v = value.strip().lower()
    if not v.startswith("gemodel"):
        return parse_percent(key, value)
    parts = v.split("/")
    if parts[0] != "gemodel" or not 2 <= len(parts) <= 5:
        raise _err(key, value, "expected gemodel/p%[/r%[/1-h%[/1-k%]]]")
    p = [parse_percent(key, x) for x in parts[1:]]
    return GeModel(p=p[0], r=p[1] if len(p) > 1 else 1.0 - p[0],
                   bad_loss=p[2] if len(p) > 2 else 1.0, good_loss=p[3] if len(p) > 3 else 0.0)


# -- the table -----------------------------------------------------------------------------------
_U32 = (1 << 32) - 1
# per-direction key -> parser(key, value) -> parsed value
DIR_KEYS: dict[str, Callable[[str, str], object]] = {
    "loss": _loss,
    "delay": lambda k, v: parse_time(k, v),
    "jitter": lambda k, v: parse_time(k, v),
    "reorder": parse_percent,
    "duplicate": parse_percent,
    "corrupt": parse_percent,
    "limit": lambda k, v: parse_count(k, v, 1, 1_000_000),
    "rate": parse_rate,
    "pps": lambda k, v: parse_count(k, v, 0, 100_000_000),
    "bw_size": lambda k, v: parse_count(k, v, 0, _U32, sizes=True),
    "bw_refill": lambda k, v: parse_time(k, v, bare=1e-3, hi=3600.0),
    "bw_burst": lambda k, v: parse_count(k, v, 0, _U32, sizes=True),
    "ops_size": lambda k, v: parse_count(k, v, 0, _U32, sizes=True),
    "ops_refill": lambda k, v: parse_time(k, v, bare=1e-3, hi=3600.0),
    "ops_burst": lambda k, v: parse_count(k, v, 0, _U32, sizes=True),
}
# port-wide keys -> parser
PORT_KEYS: dict[str, Callable[[str, str], object]] = {
    "seed": lambda k, v: parse_count(k, v, 0, (1 << 63) - 1),
    "shape": _on_off,
    "vlan": parse_vlan,
    "trunk": parse_vlan_list,
    "uplink_vlan": parse_vlan,
    "uplink_trunk": parse_vlan_list,
    "uplink_dev": _ifname,
}
SWITCH_ONLY = ("vlan", "trunk", "uplink_vlan", "uplink_trunk", "uplink_dev")
# what ``virtwire ctl port/set`` may change on a running port
RUNTIME_KEYS = frozenset([f"{d}.{k}" for d in DIRECTIONS for k in DIR_KEYS]
                         + ["vlan", "trunk"])


def all_keys() -> list[str]:
    return sorted([f"{d}.{k}" for d in DIRECTIONS for k in DIR_KEYS] + list(PORT_KEYS))


def is_key(key: str) -> bool:
    d, dot, k = key.partition(".")
    return key in PORT_KEYS or (bool(dot) and d in DIRECTIONS and k in DIR_KEYS)


def parse_value(key: str, value: str) -> object:
    """Check one key's value (NetlabError when it is unknown or bad)."""
    if key in PORT_KEYS:
        return PORT_KEYS[key](key, value)
    d, dot, k = key.partition(".")
    if dot and d in DIRECTIONS and k in DIR_KEYS:
        return DIR_KEYS[k](key, value)
    raise NetlabError(f"unknown key {key!r} (netlab keys: {', '.join(all_keys())})")


def parse_port_keys(opts: Mapping[str, str], backend: str) -> dict[str, str]:
    """The netlab keys of one ``--port`` (checked), as given; raises NetlabError."""
    out = {k: v for k, v in opts.items() if is_key(k)}
    for k, v in out.items():
        parse_value(k, v)
        if k in SWITCH_ONLY and backend != "switch":
            raise NetlabError(f"{k}= needs backend=switch (got backend={backend})")
    for d in DIRECTIONS:
        dir_spec(out, d)  # the combination must make sense too
    return out


def apply_to_port(cfg: object, opts: Mapping[str, str]) -> None:
    """``config.parse_port``'s one call: check this port's netlab keys and keep them on
    ``cfg.netlab``; a ``uplink=vxlan:VNI@REMOTE`` becomes a TAP uplink plus
    ``cfg.netlab_vxlan`` (joined to the VXLAN device by ``wire``)."""
    backend = getattr(cfg, "backend", "")
    cfg.netlab = parse_port_keys(opts, backend)  # type: ignore[attr-defined]
    uplink = getattr(cfg, "uplink", None)
    vx = parse_vxlan("uplink", uplink) if uplink else None
    cfg.netlab_vxlan = vx  # type: ignore[attr-defined]
    if vx is not None:
        cfg.uplink = f"vwu{vx.vni}"  # type: ignore[attr-defined]
    elif "uplink_dev" in cfg.netlab:  # type: ignore[attr-defined]
        raise NetlabError("uplink_dev= needs uplink=vxlan:VNI@REMOTE")


def dir_spec(opts: Mapping[str, str], direction: str) -> DirSpec:
    """The ``DirSpec`` of ``direction`` from ``tx.*``/``rx.*`` keys (strings, as given)."""
    p = {k.split(".", 1)[1]: v for k, v in opts.items() if k.startswith(direction + ".")}
    val = {k: DIR_KEYS[k](f"{direction}.{k}", v) for k, v in p.items() if k in DIR_KEYS}
    loss = val.get("loss", 0.0)
    kw: dict[str, object] = {
        "loss": loss if isinstance(loss, float) else 0.0,
        "gemodel": loss if isinstance(loss, GeModel) else None,
    }
    for k in ("delay", "jitter", "reorder", "duplicate", "corrupt", "limit"):
        if k in val:
            kw[k] = val[k]
    kw["bandwidth"] = _bucket(direction, "bw", val, "rate", lambda r: r / 8.0)
    kw["ops"] = _bucket(direction, "ops", val, "pps", float)
    return DirSpec(**kw)  # type: ignore[arg-type]


def _bucket(direction: str, prefix: str, val: Mapping[str, object], short: str,
            per_second: Callable[[float], float]) -> BucketSpec:
    size_key = f"{prefix}_size"
    explicit = [k for k in (size_key, f"{prefix}_refill", f"{prefix}_burst") if k in val]
    rate = val.get(short)
    if rate is not None and explicit:
        raise NetlabError(f"{direction}.{short}= and {direction}.{explicit[0]}= both set the "
                          f"same bucket: give one of them")
    if rate is not None:
        per_s = per_second(float(rate))  # type: ignore[arg-type]
        if not per_s:
            return BucketSpec()
        return BucketSpec(size=max(1, round(per_s * RATE_BUCKET_MS / 1000.0)),
                          refill_ms=RATE_BUCKET_MS)
    if not explicit:
        return BucketSpec()
    size = int(val.get(size_key, 0))  # type: ignore[call-overload]
    refill = float(val.get(f"{prefix}_refill", 1.0))  # type: ignore[arg-type]
    if size and refill <= 0:
        raise NetlabError(f"{direction}.{prefix}_refill=0: a bucket with a size needs a refill "
                          "time > 0")
    return BucketSpec(size=size, refill_ms=refill * 1000.0,
                      burst=int(val.get(f"{prefix}_burst", 0)))  # type: ignore[call-overload]
