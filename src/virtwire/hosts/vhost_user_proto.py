"""vhost-user wire protocol: message table, codec, validation and fd passing (side-neutral).

Theory of operation
-------------------
vhost-user (QEMU docs/interop/vhost-user.rst) runs over a UNIX stream socket. Every message is a
12-byte header -- ``u32 request``, ``u32 flags`` (bits 0-1 the version, 0x1; bit 2 REPLY; bit 3
NEED_REPLY), ``u32 size`` -- followed by ``size`` bytes of payload. File descriptors (guest RAM
memfds, kick/call eventfds) travel as SCM_RIGHTS ancillary data with the header.

This module knows the *shape* of every message and nothing about what a back end or a front end
does with it, so both halves import it: ``hosts.vhost_user`` (our device's back end) and
``drive.vhost_user_frontend`` (our driver's front end). ``REQUESTS`` is the table

    request code -> RequestSpec(name, payload kind, allowed sizes, fd rule, reply kind)

and ``decode_request`` / ``decode_reply`` check a received message against it: size, fd count,
region count, config size, NOFD flag consistency. Anything wrong raises ``ProtocolError`` with a
one-line reason. Semantics (is the queue index in range, does an address translate) are the
receiver's job; framing errors that make the stream unparseable (bad version, absurd size) raise
``FramingError`` and the caller drops the connection.

File descriptors are a resource the peer forces on us: ``recv_message`` receives them with
MSG_CMSG_CLOEXEC, and a message whose fds are refused has them closed (``Message.close_fds``)
before the error is reported, so a hostile front end cannot exhaust our fd table.
"""

from __future__ import annotations

import array
import enum
import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from virtwire import trace as _trace

__all__ = [
    "VhostUserRequest",
    "VhostUserBackendRequest",
    "ProtocolError",
    "FramingError",
    "Message",
    "VringState",
    "VringAddr",
    "VringFile",
    "MemRegion",
    "MemTable",
    "ConfigSpace",
    "LogBase",
    "RequestSpec",
    "REQUESTS",
    "encode",
    "encode_payload",
    "decode_header",
    "decode_request",
    "decode_reply",
    "recv_message",
    "send_message",
    "protocol_feature_names",
]

# --- header (vhost-user.rst "Header") ------------------------------------------------------
VHOST_USER_HDR = struct.Struct("<III")
VHOST_USER_HDR_SIZE = VHOST_USER_HDR.size  # 12
VHOST_USER_VERSION = 0x1
VHOST_USER_VERSION_MASK = 0x3
VHOST_USER_REPLY_MASK = 0x1 << 2
VHOST_USER_NEED_REPLY_MASK = 0x1 << 3
VHOST_USER_KNOWN_FLAGS = (
    VHOST_USER_VERSION_MASK | VHOST_USER_REPLY_MASK | VHOST_USER_NEED_REPLY_MASK
)

VHOST_MEMORY_BASELINE_NREGIONS = 8
VHOST_USER_MAX_CONFIG_SIZE = 256
VHOST_USER_MAX_PAYLOAD = 4096  # larger than any message we know; beyond it the stream is garbage
VHOST_USER_MAX_FDS = 8  # at most this many fds ride with one message (memory table)
VHOST_USER_VRING_IDX_MASK = 0xFF
VHOST_USER_VRING_NOFD_MASK = 0x1 << 8
VHOST_VRING_F_LOG = 0  # bit in VringAddr.flags

# --- protocol feature bits (vhost-user.rst "Protocol features") ----------------------------
VHOST_USER_PROTOCOL_F_MQ = 0
VHOST_USER_PROTOCOL_F_LOG_SHMFD = 1
VHOST_USER_PROTOCOL_F_RARP = 2
VHOST_USER_PROTOCOL_F_REPLY_ACK = 3
VHOST_USER_PROTOCOL_F_NET_MTU = 4
VHOST_USER_PROTOCOL_F_BACKEND_REQ = 5
VHOST_USER_PROTOCOL_F_CROSS_ENDIAN = 6
VHOST_USER_PROTOCOL_F_CRYPTO_SESSION = 7
VHOST_USER_PROTOCOL_F_PAGEFAULT = 8
VHOST_USER_PROTOCOL_F_CONFIG = 9
VHOST_USER_PROTOCOL_F_BACKEND_SEND_FD = 10
VHOST_USER_PROTOCOL_F_HOST_NOTIFIER = 11
VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD = 12
VHOST_USER_PROTOCOL_F_RESET_DEVICE = 13
VHOST_USER_PROTOCOL_F_INBAND_NOTIFICATIONS = 14
VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS = 15
VHOST_USER_PROTOCOL_F_STATUS = 16

PROTOCOL_FEATURE_NAMES = {
    VHOST_USER_PROTOCOL_F_MQ: "MQ",
    VHOST_USER_PROTOCOL_F_LOG_SHMFD: "LOG_SHMFD",
    VHOST_USER_PROTOCOL_F_RARP: "RARP",
    VHOST_USER_PROTOCOL_F_REPLY_ACK: "REPLY_ACK",
    VHOST_USER_PROTOCOL_F_NET_MTU: "NET_MTU",
    VHOST_USER_PROTOCOL_F_BACKEND_REQ: "BACKEND_REQ",
    VHOST_USER_PROTOCOL_F_CROSS_ENDIAN: "CROSS_ENDIAN",
    VHOST_USER_PROTOCOL_F_CRYPTO_SESSION: "CRYPTO_SESSION",
    VHOST_USER_PROTOCOL_F_PAGEFAULT: "PAGEFAULT",
    VHOST_USER_PROTOCOL_F_CONFIG: "CONFIG",
    VHOST_USER_PROTOCOL_F_BACKEND_SEND_FD: "BACKEND_SEND_FD",
    VHOST_USER_PROTOCOL_F_HOST_NOTIFIER: "HOST_NOTIFIER",
    VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD: "INFLIGHT_SHMFD",
    VHOST_USER_PROTOCOL_F_RESET_DEVICE: "RESET_DEVICE",
    VHOST_USER_PROTOCOL_F_INBAND_NOTIFICATIONS: "INBAND_NOTIFICATIONS",
    VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS: "CONFIGURE_MEM_SLOTS",
    VHOST_USER_PROTOCOL_F_STATUS: "STATUS",
}


def protocol_feature_names(bits: int) -> list[str]:
    """Names of the set protocol-feature bits (unknown ones as ``bitN``)."""
    return [PROTOCOL_FEATURE_NAMES.get(b, f"bit{b}") for b in range(64) if bits >> b & 1]


_trace.register_names("vhost_protocol", protocol_feature_names)  # names in vhost trace events


class VhostUserRequest(enum.IntEnum):
    """Front-end -> back-end request codes (vhost-user.rst "Front-end message types")."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class VhostUserBackendRequest(enum.IntEnum):
    """Back-end -> front-end request codes (the optional back-end channel); named for logs."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5


def request_name(code: int) -> str:
    try:
        return VhostUserRequest(code).name
    except ValueError:
        return f"request#{code}"


class ProtocolError(Exception):
    """A message that breaks vhost-user's rules; the message is refused, the stream goes on."""


class FramingError(ProtocolError):
    """The byte stream itself cannot be trusted any more (bad version, absurd size): disconnect."""


# --- payloads ------------------------------------------------------------------------------
_U64 = struct.Struct("<Q")
_STATE = struct.Struct("<II")  # struct vhost_vring_state {unsigned index; unsigned num}
_ADDR = struct.Struct("<IIQQQQ")  # index, flags, desc, used, avail, log user addresses
_REGION = struct.Struct("<QQQQ")  # guest_phys_addr, memory_size, userspace_addr, mmap_offset
_MEMHDR = struct.Struct("<II")  # nregions, padding
_CONFIGHDR = struct.Struct("<III")  # offset, size, flags
_LOG = struct.Struct("<QQ")  # mmap_size, mmap_offset


@dataclass(frozen=True, slots=True)
class VringState:
    """``struct vhost_vring_state``: NUM, BASE, ENABLE, ENDIAN, GET_VRING_BASE's reply."""

    index: int
    num: int


@dataclass(frozen=True, slots=True)
class VringAddr:
    """``struct vhost_vring_addr`` as SET_VRING_ADDR carries it (front-end virtual addresses)."""

    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int = 0


@dataclass(frozen=True, slots=True)
class VringFile:
    """SET_VRING_KICK/CALL/ERR: bits 0-7 the ring index, bit 8 "no fd" (polling / no signal)."""

    index: int
    fd: int | None  # None when VHOST_USER_VRING_NOFD_MASK is set
    raw: int = 0


@dataclass(frozen=True, slots=True)
class MemRegion:
    """``VhostUserMemoryRegion``; ``fd`` is filled in from the ancillary data (or -1)."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int
    fd: int = -1


@dataclass(frozen=True, slots=True)
class MemTable:
    regions: tuple[MemRegion, ...]


@dataclass(frozen=True, slots=True)
class ConfigSpace:
    """GET_CONFIG / SET_CONFIG payload: device config bytes ``[offset, offset+size)``."""

    offset: int
    size: int
    flags: int
    data: bytes


@dataclass(frozen=True, slots=True)
class LogBase:
    mmap_size: int
    mmap_offset: int
    fd: int = -1


class P(enum.Enum):
    """Payload kinds of the table."""

    NONE = "none"
    U64 = "u64"
    STATE = "vring state"
    ADDR = "vring address"
    FILE = "vring file"
    MEMTABLE = "memory table"
    MEMREG = "single memory region"
    CONFIG = "device config"
    LOG = "log description"
    RAW = "opaque"  # not interpreted (requests we refuse anyway)


# Allowed payload sizes per kind (for kinds with variable sizes see _check_size).
_FIXED_SIZE = {
    P.U64: _U64.size,
    P.STATE: _STATE.size,
    P.ADDR: _ADDR.size,
    P.FILE: _U64.size,
    P.MEMREG: 8 + _REGION.size,
    P.LOG: _LOG.size,
}


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One row of the table: how a request looks on the wire and what answers it.

    ``fds``: ``(min, max)`` file descriptors, or ``None`` when the payload decides (memory table:
    one per region; vring file: one unless NOFD). ``reply``: the payload kind of the reply a back
    end always sends (GETs), or ``None`` when only REPLY_ACK's u64 may answer.
    """

    name: str
    payload: P
    fds: tuple[int, int] | None = (0, 0)
    reply: P | None = None


R = VhostUserRequest
REQUESTS: dict[int, RequestSpec] = {
    R.GET_FEATURES: RequestSpec("GET_FEATURES", P.NONE, reply=P.U64),
    R.SET_FEATURES: RequestSpec("SET_FEATURES", P.U64),
    R.SET_OWNER: RequestSpec("SET_OWNER", P.NONE),
    R.RESET_OWNER: RequestSpec("RESET_OWNER", P.NONE),
    R.SET_MEM_TABLE: RequestSpec("SET_MEM_TABLE", P.MEMTABLE, fds=None),
    R.SET_LOG_BASE: RequestSpec("SET_LOG_BASE", P.LOG, fds=(1, 1), reply=P.U64),
    R.SET_LOG_FD: RequestSpec("SET_LOG_FD", P.NONE, fds=(1, 1)),
    R.SET_VRING_NUM: RequestSpec("SET_VRING_NUM", P.STATE),
    R.SET_VRING_ADDR: RequestSpec("SET_VRING_ADDR", P.ADDR),
    R.SET_VRING_BASE: RequestSpec("SET_VRING_BASE", P.STATE),
    R.GET_VRING_BASE: RequestSpec("GET_VRING_BASE", P.STATE, reply=P.STATE),
    R.SET_VRING_KICK: RequestSpec("SET_VRING_KICK", P.FILE, fds=None),
    R.SET_VRING_CALL: RequestSpec("SET_VRING_CALL", P.FILE, fds=None),
    R.SET_VRING_ERR: RequestSpec("SET_VRING_ERR", P.FILE, fds=None),
    R.GET_PROTOCOL_FEATURES: RequestSpec("GET_PROTOCOL_FEATURES", P.NONE, reply=P.U64),
    R.SET_PROTOCOL_FEATURES: RequestSpec("SET_PROTOCOL_FEATURES", P.U64),
    R.GET_QUEUE_NUM: RequestSpec("GET_QUEUE_NUM", P.NONE, reply=P.U64),
    R.SET_VRING_ENABLE: RequestSpec("SET_VRING_ENABLE", P.STATE),
    R.SEND_RARP: RequestSpec("SEND_RARP", P.U64),
    R.NET_SET_MTU: RequestSpec("NET_SET_MTU", P.U64),
    R.SET_BACKEND_REQ_FD: RequestSpec("SET_BACKEND_REQ_FD", P.NONE, fds=(1, 1)),
    R.IOTLB_MSG: RequestSpec("IOTLB_MSG", P.RAW),
    R.SET_VRING_ENDIAN: RequestSpec("SET_VRING_ENDIAN", P.STATE),
    R.GET_CONFIG: RequestSpec("GET_CONFIG", P.CONFIG, reply=P.CONFIG),
    R.SET_CONFIG: RequestSpec("SET_CONFIG", P.CONFIG),
    R.CREATE_CRYPTO_SESSION: RequestSpec("CREATE_CRYPTO_SESSION", P.RAW, reply=P.RAW),
    R.CLOSE_CRYPTO_SESSION: RequestSpec("CLOSE_CRYPTO_SESSION", P.U64),
    R.POSTCOPY_ADVISE: RequestSpec("POSTCOPY_ADVISE", P.NONE, reply=P.RAW),
    R.POSTCOPY_LISTEN: RequestSpec("POSTCOPY_LISTEN", P.NONE),
    R.POSTCOPY_END: RequestSpec("POSTCOPY_END", P.NONE, reply=P.U64),
    R.GET_INFLIGHT_FD: RequestSpec("GET_INFLIGHT_FD", P.RAW, reply=P.RAW),
    R.SET_INFLIGHT_FD: RequestSpec("SET_INFLIGHT_FD", P.RAW, fds=(1, 1)),
    R.GPU_SET_SOCKET: RequestSpec("GPU_SET_SOCKET", P.NONE, fds=(1, 1)),
    R.RESET_DEVICE: RequestSpec("RESET_DEVICE", P.NONE),
    R.VRING_KICK: RequestSpec("VRING_KICK", P.STATE),
    R.GET_MAX_MEM_SLOTS: RequestSpec("GET_MAX_MEM_SLOTS", P.NONE, reply=P.U64),
    R.ADD_MEM_REG: RequestSpec("ADD_MEM_REG", P.MEMREG, fds=(1, 1)),
    # QEMU sends REM_MEM_REG without an fd; older front ends attached the region's fd.
    R.REM_MEM_REG: RequestSpec("REM_MEM_REG", P.MEMREG, fds=(0, 1)),
    R.SET_STATUS: RequestSpec("SET_STATUS", P.U64),
    R.GET_STATUS: RequestSpec("GET_STATUS", P.NONE, reply=P.U64),
}
del R


# --- messages ------------------------------------------------------------------------------
@dataclass(slots=True)
class Message:
    """One received message: header fields, raw payload and the fds that came with it.

    The receiver owns ``fds``: it either keeps an fd (and removes it from the list with
    ``take_fd``) or lets ``close_fds`` close what is left.
    """

    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return request_name(self.request)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & VHOST_USER_NEED_REPLY_MASK)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & VHOST_USER_REPLY_MASK)

    def take_fd(self, fd: int) -> int:
        """Claim ``fd`` (the caller now closes it); it is no longer closed by ``close_fds``."""
        self.fds.remove(fd)
        return fd

    def close_fds(self) -> None:
        while self.fds:
            fd = self.fds.pop()
            try:
                os.close(fd)
            except OSError:
                pass


def decode_header(data: bytes) -> tuple[int, int, int]:
    """(request, flags, size) from 12 header bytes; ``FramingError`` if they cannot be trusted."""
    if len(data) != VHOST_USER_HDR_SIZE:
        raise FramingError(f"short header ({len(data)} of {VHOST_USER_HDR_SIZE} bytes)")
    request, flags, size = VHOST_USER_HDR.unpack(data)
    if flags & VHOST_USER_VERSION_MASK != VHOST_USER_VERSION:
        raise FramingError(
            f"{request_name(request)}: protocol version {flags & VHOST_USER_VERSION_MASK}, "
            f"expected {VHOST_USER_VERSION} (flags {flags:#x})"
        )
    if size > VHOST_USER_MAX_PAYLOAD:
        raise FramingError(
            f"{request_name(request)}: payload size {size} exceeds {VHOST_USER_MAX_PAYLOAD}"
        )
    return request, flags, size


def encode(
    request: int, payload: bytes = b"", *, reply: bool = False, need_reply: bool = False
) -> bytes:
    """Header + payload bytes of one message (fds travel separately, see ``send_message``)."""
    flags = VHOST_USER_VERSION
    if reply:
        flags |= VHOST_USER_REPLY_MASK
    if need_reply:
        flags |= VHOST_USER_NEED_REPLY_MASK
    return VHOST_USER_HDR.pack(int(request), flags, len(payload)) + payload


def encode_payload(kind: P, value: object) -> bytes:
    """Serialise a payload object of ``kind`` (both directions)."""
    if kind is P.NONE:
        return b""
    if kind is P.U64:
        assert isinstance(value, int)
        return _U64.pack(value & 0xFFFFFFFFFFFFFFFF)
    if kind is P.STATE:
        assert isinstance(value, VringState)
        return _STATE.pack(value.index & 0xFFFFFFFF, value.num & 0xFFFFFFFF)
    if kind is P.ADDR:
        assert isinstance(value, VringAddr)
        return _ADDR.pack(value.index, value.flags, value.desc_user_addr, value.used_user_addr,
                          value.avail_user_addr, value.log_guest_addr)
    if kind is P.FILE:
        assert isinstance(value, VringFile)
        raw = value.index & VHOST_USER_VRING_IDX_MASK
        if value.fd is None:
            raw |= VHOST_USER_VRING_NOFD_MASK
        return _U64.pack(raw)
    if kind is P.MEMTABLE:
        assert isinstance(value, MemTable)
        out = _MEMHDR.pack(len(value.regions), 0)
        for r in value.regions:
            out += _REGION.pack(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
        return out
    if kind is P.MEMREG:
        assert isinstance(value, MemRegion)
        return _U64.pack(0) + _REGION.pack(value.guest_phys_addr, value.memory_size,
                                           value.userspace_addr, value.mmap_offset)
    if kind is P.CONFIG:
        assert isinstance(value, ConfigSpace)
        return _CONFIGHDR.pack(value.offset, value.size, value.flags) + bytes(value.data)
    if kind is P.LOG:
        assert isinstance(value, LogBase)
        return _LOG.pack(value.mmap_size, value.mmap_offset)
    if kind is P.RAW:
        return bytes(value)  # type: ignore[arg-type]
    raise ValueError(f"unknown payload kind {kind}")


def _check_region(r: MemRegion, where: str) -> None:
    if r.memory_size == 0:
        raise ProtocolError(f"{where}: region at {r.guest_phys_addr:#x} has size 0")
    for name, base in (("guest", r.guest_phys_addr), ("user", r.userspace_addr),
                       ("mmap offset", r.mmap_offset)):
        if base + r.memory_size > 1 << 64:
            raise ProtocolError(
                f"{where}: region {name} address {base:#x}+{r.memory_size:#x} wraps 2^64"
            )


def _decode_payload(kind: P, body: bytes, fds: Sequence[int], where: str) -> object:
    """Decode (and structurally check) one payload; fd rules are checked here as well."""
    n = len(body)
    if kind in _FIXED_SIZE and n != _FIXED_SIZE[kind]:
        raise ProtocolError(f"{where}: payload of {n} bytes, expected {_FIXED_SIZE[kind]}")
    if kind is P.NONE:
        # QEMU sends 0 bytes; some front ends send a zero u64. Anything else is refused.
        if n not in (0, 8):
            raise ProtocolError(f"{where}: payload of {n} bytes, expected none")
        return None
    if kind is P.U64:
        return _U64.unpack(body)[0]
    if kind is P.STATE:
        return VringState(*_STATE.unpack(body))
    if kind is P.ADDR:
        return VringAddr(*_ADDR.unpack(body))
    if kind is P.FILE:
        raw = _U64.unpack(body)[0]
        nofd = bool(raw & VHOST_USER_VRING_NOFD_MASK)
        if raw & ~(VHOST_USER_VRING_IDX_MASK | VHOST_USER_VRING_NOFD_MASK):
            raise ProtocolError(f"{where}: unknown bits in vring file word {raw:#x}")
        want = 0 if nofd else 1
        if len(fds) != want:
            raise ProtocolError(
                f"{where}: {len(fds)} fds with {'NOFD set' if nofd else 'an fd expected'}"
            )
        return VringFile(index=raw & VHOST_USER_VRING_IDX_MASK,
                         fd=None if nofd else fds[0], raw=raw)
    if kind is P.MEMTABLE:
        if n < _MEMHDR.size:
            raise ProtocolError(f"{where}: payload of {n} bytes is shorter than its header")
        nregions, _pad = _MEMHDR.unpack_from(body)
        if not 1 <= nregions <= VHOST_MEMORY_BASELINE_NREGIONS:
            raise ProtocolError(
                f"{where}: {nregions} regions (1..{VHOST_MEMORY_BASELINE_NREGIONS} allowed)"
            )
        need = _MEMHDR.size + nregions * _REGION.size
        full = _MEMHDR.size + VHOST_MEMORY_BASELINE_NREGIONS * _REGION.size
        # QEMU sends exactly the used regions; others send the whole 8-slot array.
        if n not in (need, full):
            raise ProtocolError(f"{where}: payload of {n} bytes for {nregions} regions "
                                f"(expected {need} or {full})")
        if len(fds) != nregions:
            raise ProtocolError(f"{where}: {len(fds)} fds for {nregions} regions")
        regions = []
        for i in range(nregions):
            gpa, size, uva, off = _REGION.unpack_from(body, _MEMHDR.size + i * _REGION.size)
            r = MemRegion(gpa, size, uva, off, fds[i])
            _check_region(r, where)
            regions.append(r)
        spans = sorted((r.guest_phys_addr, r.guest_phys_addr + r.memory_size) for r in regions)
        for (_a0, a1), (b0, _b1) in zip(spans, spans[1:]):
            if b0 < a1:
                raise ProtocolError(f"{where}: regions overlap at guest address {b0:#x}")
        return MemTable(tuple(regions))
    if kind is P.MEMREG:
        gpa, size, uva, off = _REGION.unpack_from(body, 8)
        r = MemRegion(gpa, size, uva, off, fds[0] if fds else -1)
        _check_region(r, where)
        return r
    if kind is P.CONFIG:
        if n < _CONFIGHDR.size:
            raise ProtocolError(f"{where}: payload of {n} bytes is shorter than its header")
        offset, size, flags = _CONFIGHDR.unpack_from(body)
        if size > VHOST_USER_MAX_CONFIG_SIZE or offset > VHOST_USER_MAX_CONFIG_SIZE - size:
            raise ProtocolError(
                f"{where}: config window {offset}+{size} beyond {VHOST_USER_MAX_CONFIG_SIZE}"
            )
        if n != _CONFIGHDR.size + size:
            raise ProtocolError(f"{where}: config payload of {n} bytes for size {size}")
        return ConfigSpace(offset, size, flags, bytes(body[_CONFIGHDR.size :]))
    if kind is P.LOG:
        size, off = _LOG.unpack(body)
        return LogBase(size, off, fds[0] if fds else -1)
    if kind is P.RAW:
        return bytes(body)
    raise ValueError(f"unknown payload kind {kind}")  # our bug, not the peer's


def decode_request(msg: Message) -> tuple[RequestSpec, object]:
    """Check a received request against ``REQUESTS``; returns (spec, payload object).

    Raises ``ProtocolError``. On error the caller must ``msg.close_fds()`` (nothing was kept).
    """
    spec = REQUESTS.get(msg.request)
    where = msg.name
    if spec is None:
        raise ProtocolError(f"unknown request {msg.request}")
    if msg.is_reply:
        raise ProtocolError(f"{where}: REPLY flag set on a request")
    if msg.flags & ~VHOST_USER_KNOWN_FLAGS:
        raise ProtocolError(f"{where}: unknown header flags {msg.flags:#x}")
    if spec.fds is not None:
        lo, hi = spec.fds
        if not lo <= len(msg.fds) <= hi:
            want = str(lo) if lo == hi else f"{lo}..{hi}"
            raise ProtocolError(f"{where}: {len(msg.fds)} fds, expected {want}")
    return spec, _decode_payload(spec.payload, msg.payload, msg.fds, where)


def decode_reply(request: int, msg: Message) -> object:
    """Check a reply to ``request`` (front-end side): REPLY flag, matching code, payload shape.

    A REPLY_ACK answer is decoded as a u64 (0 = success). Replies never carry fds here.
    """
    where = f"reply to {request_name(request)}"
    if not msg.is_reply:
        raise ProtocolError(f"{where}: REPLY flag missing (flags {msg.flags:#x})")
    if msg.request != request:
        raise ProtocolError(f"{where}: got a reply to {msg.name}")
    if msg.fds:
        raise ProtocolError(f"{where}: {len(msg.fds)} unexpected fds")
    spec = REQUESTS.get(request)
    kind = spec.reply if spec is not None and spec.reply is not None else P.U64
    return _decode_payload(kind, msg.payload, (), where)


# --- socket I/O ------------------------------------------------------------------------------
_FD_SIZE = array.array("i").itemsize
# Room for more fds than allowed, so an excess is seen (and closed) rather than silently cut.
_ANC_SPACE = socket.CMSG_SPACE((VHOST_USER_MAX_FDS + 8) * _FD_SIZE)


def _fds_from_ancdata(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, ctype, data in ancdata:
        if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - (len(data) % _FD_SIZE)])
            fds.extend(arr)
    return fds


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _recv_exact(sock: socket.socket, n: int, fds: list[int]) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data, anc, _flags, _addr = sock.recvmsg(n - len(buf), _ANC_SPACE,
                                               socket.MSG_CMSG_CLOEXEC)
        fds.extend(_fds_from_ancdata(anc))
        if not data:
            raise FramingError(f"connection closed inside a message ({len(buf)} of {n} bytes)")
        buf += data
    return bytes(buf)


def recv_message(sock: socket.socket) -> Message | None:
    """Read one message with its fds; ``None`` on a clean EOF before a header.

    Raises ``FramingError`` when the stream is unusable (fds are closed first) and
    ``ProtocolError`` when too many fds arrived (they are closed; the payload was consumed, so
    the stream stays in step).
    """
    fds: list[int] = []
    try:
        data, anc, flags, _addr = sock.recvmsg(VHOST_USER_HDR_SIZE, _ANC_SPACE,
                                               socket.MSG_CMSG_CLOEXEC)
        fds.extend(_fds_from_ancdata(anc))
        if not data and not fds:
            return None
        if len(data) < VHOST_USER_HDR_SIZE:
            data += _recv_exact(sock, VHOST_USER_HDR_SIZE - len(data), fds)
        request, mflags, size = decode_header(data)
        payload = _recv_exact(sock, size, fds) if size else b""
    except BaseException:
        _close_all(fds)
        raise
    msg = Message(request, mflags, payload, fds)
    if flags & socket.MSG_CTRUNC or len(fds) > VHOST_USER_MAX_FDS:
        msg.close_fds()
        raise ProtocolError(f"{msg.name}: too many fds (ancillary data truncated), closed them")
    return msg


def send_message(sock: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
    """Send one encoded message, its fds riding with the first byte (SCM_RIGHTS)."""
    anc = []
    if fds:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    sent = sock.sendmsg([data], anc)
    if sent < len(data):
        sock.sendall(data[sent:])
