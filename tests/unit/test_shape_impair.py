"""The impairment lane: seeded decisions, netem's meanings, counters."""

from __future__ import annotations

import math
import random

from virtwire.net.header import VirtioNetHdr, inet_sum
from virtwire.netlab.impair import LANE_COUNTERS, REORDER_GAP, DirSpec, GeModel, Lane
from virtwire.virtio.spec import VIRTIO_NET_HDR_F_NEEDS_CSUM


class Clock:
    def __init__(self) -> None:
        self.t = 50.0

    def __call__(self) -> float:
        return self.t


def frames(n: int) -> list[bytes]:
    return [bytes(12) + i.to_bytes(4, "big") * 10 for i in range(n)]


def run(spec: DirSpec, seed: int, n: int = 2000) -> tuple[list[bytes], Lane]:
    clk = Clock()
    lane = Lane(spec, random.Random(seed), clk)
    out: list[bytes] = []
    for f in frames(n):
        out += lane.push(f)
        clk.t += 0.001
        out += lane.release()
    clk.t += 100
    out += lane.release()
    return out, lane


def test_counters_all_present_from_the_start() -> None:
    lane = Lane(DirSpec(), random.Random(1), Clock())
    assert set(lane.counters) == set(LANE_COUNTERS) and not any(lane.counters.values())


def test_loss_is_binomial_and_repeats_with_the_seed() -> None:
    n, p = 2000, 0.1
    out, lane = run(DirSpec(loss=p), seed=7, n=n)
    lost = lane.counters["lost"]
    assert lost == n - len(out) and lane.counters["passed"] == len(out)
    sd = math.sqrt(n * p * (1 - p))
    assert abs(lost - n * p) < 4 * sd
    again, lane2 = run(DirSpec(loss=p), seed=7, n=n)
    assert again == out and lane2.counters == lane.counters
    other, _ = run(DirSpec(loss=p), seed=8, n=n)
    assert other != out


def test_gilbert_elliott_losses_come_in_bursts() -> None:
    ge = GeModel(p=0.02, r=0.25, bad_loss=1.0, good_loss=0.0)
    n = 20000
    out, lane = run(DirSpec(gemodel=ge), seed=3, n=n)
    kept = {int.from_bytes(f[12:16], "big") for f in out}
    lost = [i for i in range(n) if i not in kept]
    # stationary bad-state share p/(p+r) ~ 7.4 %, mean burst length 1/r = 4
    assert abs(len(lost) / n - ge.p / (ge.p + ge.r)) < 0.02
    bursts = sum(1 for i in lost if i - 1 not in set(lost))
    assert 3.0 < len(lost) / bursts < 5.5


def test_delay_holds_until_due_and_jitter_stays_in_range() -> None:
    clk = Clock()
    lane = Lane(DirSpec(delay=0.05, jitter=0.01), random.Random(1), clk)
    sent_at = {}
    for i, f in enumerate(frames(200)):
        assert lane.push(f) == []
        sent_at[i] = clk.t
        clk.t += 0.0005
    assert lane.queued() == 200 and lane.counters["delayed"] == 200
    got: list[tuple[int, float]] = []
    while lane.queued():
        nxt = lane.next_wakeup()
        assert nxt is not None
        clk.t = nxt
        got += [(int.from_bytes(f[12:16], "big"), clk.t) for f in lane.release()]
    lat = [t - sent_at[i] for i, t in got]
    assert min(lat) >= 0.04 - 1e-9 and max(lat) <= 0.06 + 1e-9
    assert sorted(i for i, _ in got) == list(range(200))
    assert [i for i, _ in got] != list(range(200))  # jitter reorders, as in netem


def test_reorder_with_delay_sends_chosen_frames_at_once() -> None:
    out, lane = run(DirSpec(delay=0.01, reorder=0.25), seed=5, n=1000)
    assert len(out) == 1000
    idx = [int.from_bytes(f[12:16], "big") for f in out]
    assert idx != sorted(idx)
    assert abs(lane.counters["reordered"] - 250) < 4 * math.sqrt(1000 * 0.25 * 0.75)


def test_reorder_without_delay_swaps_with_the_next_frame() -> None:
    clk = Clock()
    lane = Lane(DirSpec(reorder=1.0), random.Random(1), clk)
    a, b = frames(2)
    assert lane.push(a) == []
    assert lane.next_wakeup() == clk.t + REORDER_GAP
    lane.spec = DirSpec()
    assert lane.push(b) == [b, a]
    # alone, a held frame leaves after the gap
    lane.spec = DirSpec(reorder=1.0)
    lane.push(a)
    clk.t += REORDER_GAP
    assert lane.release() == [a]


def test_duplicate_and_limit() -> None:
    out, lane = run(DirSpec(duplicate=0.5), seed=2, n=1000)
    assert len(out) == 1000 + lane.counters["duplicated"]
    clk = Clock()
    lane = Lane(DirSpec(delay=1.0, limit=3), random.Random(1), clk)
    for f in frames(3):
        assert lane.room()
        lane.push(f)
    assert not lane.room() and lane.counters["limit_waits"] == 1


def _udp_frame() -> bytes:
    ip = bytearray(b"\x45\x00\x00\x24" + bytes(4) + b"\x40\x11\x00\x00" + bytes([10, 0, 0, 1])
                   + bytes([10, 0, 0, 2]))
    ip[10:12] = (~inet_sum(ip) & 0xFFFF).to_bytes(2, "big")
    udp = bytearray(b"\x04\xd2\x16\x2e\x00\x10\x00\x00" + b"payload!")
    return bytes(6) + bytes([2] + [0] * 5) + b"\x08\x00" + bytes(ip) + bytes(udp)


def test_corrupt_flips_one_bit_after_finishing_the_checksum() -> None:
    eth = _udp_frame()
    hdr = VirtioNetHdr(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=6)
    frame = hdr.pack(12) + eth
    lane = Lane(DirSpec(corrupt=1.0), random.Random(4), Clock(), hdr_len=12)
    (out,) = lane.push(frame)
    assert lane.counters["corrupted"] == 1
    assert out[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM == 0  # checksum finished first
    body_in, body_out = frame[12 + 14:], out[12 + 14:]
    diff = [i for i in range(len(body_in)) if body_in[i] != body_out[i]]
    assert out[12:26] == eth[:14]  # Ethernet header untouched
    # exactly one bit differs apart from the UDP checksum field the finish filled in
    flips = [i for i in diff if i not in (26, 27)]
    assert len(flips) == 1 and bin(body_in[flips[0]] ^ body_out[flips[0]]).count("1") == 1
