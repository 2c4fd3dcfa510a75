#!/usr/bin/env python3
"""Benchmark ``virtwire kvm``'s exit path: Python run loop vs a small C KVM_RUN loop.

Both loops run the same guest binary (``virtwire.kvm.program``) in the same process run:

1. **exit path**: the guest's ``exits`` mode writes N dwords to a counting port (0x502), one
   ``KVM_EXIT_IO`` each, then exits on 0x501. The Python machine (``virtwire.kvm.machine``, the
   same dispatch ``virtwire kvm`` uses) and a C program built here with gcc (same VM set-up: memfd
   RAM, irqchip, PIT, 32-bit flat entry, a switch on the exit reason) each run it; microseconds
   of wall time per exit, and their ratio (goal: Python within 1.3x).
2. **burst**: the guest sends ``--frames`` frames of ``--size`` bytes through our virtio-net PCI
   device to the null backend (Python only: the C loop has no device); frames/s, exits per frame,
   microseconds per exit.

    flock /tmp/vw-heavy.lock python3 tools/bench_kvm.py [--exits N] [--frames N] [--rounds 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

C_LOOP = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static void die(const char *m) { perror(m); exit(2); }
static uint64_t now_ns(void) {
    struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + t.tv_nsec;
}
static void seg(struct kvm_segment *s, uint16_t sel, uint8_t type) {
    memset(s, 0, sizeof *s);
    s->base = 0; s->limit = 0xffffffff; s->selector = sel; s->type = type;
    s->present = 1; s->db = 1; s->s = 1; s->g = 1;
}
int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: LOOP guest.bin params.bin\n"); return 2; }
    size_t ram = 32u << 20;
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC); if (kvm < 0) die("/dev/kvm");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0); if (vm < 0) die("KVM_CREATE_VM");
    ioctl(vm, KVM_SET_TSS_ADDR, 0xfffbd000ul);
    if (ioctl(vm, KVM_CREATE_IRQCHIP, 0) < 0) die("KVM_CREATE_IRQCHIP");
    struct kvm_pit_config pit = { .flags = KVM_PIT_SPEAKER_DUMMY };
    if (ioctl(vm, KVM_CREATE_PIT2, &pit) < 0) die("KVM_CREATE_PIT2");
    int mfd = memfd_create("bench-ram", MFD_CLOEXEC); ftruncate(mfd, ram);
    uint8_t *mem = mmap(0, ram, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
    struct kvm_userspace_memory_region r = { .slot = 0, .guest_phys_addr = 0,
        .memory_size = ram, .userspace_addr = (uint64_t)mem };
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &r) < 0) die("SET_USER_MEMORY_REGION");
    FILE *f = fopen(argv[1], "rb"); if (!f) die(argv[1]);
    fread(mem + 0x10000, 1, 0x60000, f); fclose(f);
    f = fopen(argv[2], "rb"); if (!f) die(argv[2]);
    fread(mem + 0x7000, 1, 256, f); fclose(f);
    uint64_t gdt[3] = { 0, 0x00CF9A000000FFFFull, 0x00CF92000000FFFFull };
    memcpy(mem + 0x500, gdt, sizeof gdt);
    int cpu = ioctl(vm, KVM_CREATE_VCPU, 0); if (cpu < 0) die("KVM_CREATE_VCPU");
    int sz = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    struct kvm_run *run = mmap(0, sz, PROT_READ | PROT_WRITE, MAP_SHARED, cpu, 0);
    struct kvm_sregs s; ioctl(cpu, KVM_GET_SREGS, &s);
    seg(&s.cs, 0x08, 11); seg(&s.ds, 0x10, 3); s.es = s.fs = s.gs = s.ss = s.ds;
    s.gdt.base = 0x500; s.gdt.limit = 23; s.cr0 = 0x11;
    if (ioctl(cpu, KVM_SET_SREGS, &s) < 0) die("SET_SREGS");
    struct kvm_regs g; memset(&g, 0, sizeof g);
    g.rip = 0x10000; g.rflags = 2; g.rsp = 0x80000;
    if (ioctl(cpu, KVM_SET_REGS, &g) < 0) die("SET_REGS");
    uint64_t exits = 0, bench = 0, t0 = now_ns();
    for (;;) {
        if (ioctl(cpu, KVM_RUN, 0) < 0) die("KVM_RUN");
        exits++;
        if (run->exit_reason == KVM_EXIT_IO) {
            uint8_t *d = (uint8_t *)run + run->io.data_offset;
            if (run->io.port == 0x502) { bench++; continue; }
            if (run->io.port == 0x501 && run->io.size == 4) {
                uint32_t v; memcpy(&v, d, 4);
                if (v >> 16 == 0x5657) break;
            }
            if (run->io.direction == KVM_EXIT_IO_IN) memset(d, 0, run->io.size);
            continue;
        }
        if (run->exit_reason == KVM_EXIT_MMIO) {
            if (!run->mmio.is_write) memset(run->mmio.data, 0xff, 8);
            continue;
        }
        fprintf(stderr, "exit reason %u\n", run->exit_reason); return 3;
    }
    uint64_t t1 = now_ns();
    printf("{\"exits\": %llu, \"bench_exits\": %llu, \"seconds\": %.6f}\n",
           (unsigned long long)exits, (unsigned long long)bench, (t1 - t0) / 1e9);
    return 0;
}
"""


def build_c_loop() -> Path:
    from virtwire.kvm.program import cache_dir

    out = cache_dir() / f"bench-loop-{hashlib.sha256(C_LOOP.encode()).hexdigest()[:12]}"
    if not out.exists():
        src = out.with_suffix(".c")
        src.write_text(C_LOOP)
        r = subprocess.run(["gcc", "-O2", "-o", str(out), str(src)], capture_output=True,
                           text=True)
        if r.returncode != 0:
            sys.exit(f"bench_kvm: cannot build the C loop: {r.stderr.strip()[-300:]}")
    return out


def python_exits(n: int) -> dict:
    from virtwire.kvm.machine import Machine, MachineConfig

    m = Machine(MachineConfig(guest="exits", exits_count=n, device=False))
    try:
        t0 = time.perf_counter()
        res = m.run()
        wall = time.perf_counter() - t0
    finally:
        m.close()
    assert res.reason.status == 0, res.reason.message
    return {"exits": res.exits, "seconds": wall}


def c_exits(n: int, loop: Path, tmp: Path) -> dict:
    from virtwire.kvm import program

    (tmp / "guest.bin").write_bytes(program.build())
    params = program.Params("exits", exits_count=n).pack()
    (tmp / "params.bin").write_bytes(params)
    r = subprocess.run([str(loop), str(tmp / "guest.bin"), str(tmp / "params.bin")],
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        sys.exit(f"bench_kvm: C loop failed: {r.stderr.strip()}")
    return json.loads(r.stdout)


def python_burst(frames: int, size: int) -> dict:
    from virtwire.backends.null import NullBackend
    from virtwire.kvm.machine import Machine, MachineConfig

    m = Machine(MachineConfig(guest="burst", burst_count=frames, burst_size=size,
                              count_exits=True), [NullBackend("null:bench")])
    try:
        res = m.run()
    finally:
        m.close()
    assert res.reason.status == 0, res.reason.message
    tx = int(res.report["report"]["tx"])
    data_exits = sum(r["count"] for r in res.exit_table
                     if r["reg"] in ("notify.q1", "isr"))
    return {"frames": tx, "seconds": res.run_seconds, "exits": res.exits,
            "data_path_exits": data_exits,
            "frames_per_s": tx / res.run_seconds,
            "exits_per_frame": data_exits / tx}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exits", type=int, default=20000)
    ap.add_argument("--frames", type=int, default=20000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    from virtwire.kvm.vm import install_kick_signal

    install_kick_signal()
    import tempfile

    loop = build_c_loop()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for _ in range(args.rounds):
            py = python_exits(args.exits)
            c = c_exits(args.exits, loop, Path(d))
            burst = python_burst(args.frames, args.size)
            rows.append({"py_us_per_exit": py["seconds"] / py["exits"] * 1e6,
                         "c_us_per_exit": c["seconds"] / c["exits"] * 1e6,
                         **{f"burst_{k}": v for k, v in burst.items()}})
    for r in rows:
        r["ratio"] = r["py_us_per_exit"] / r["c_us_per_exit"]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"exit path, {args.exits} port exits per run (same guest binary):")
    for r in rows:
        print(f"  python {r['py_us_per_exit']:6.2f} us/exit   C {r['c_us_per_exit']:6.2f} us/exit"
              f"   ratio {r['ratio']:.2f}x")
    print(f"burst, {args.frames} frames of {args.size} bytes to the null backend (Python):")
    for r in rows:
        print(f"  {r['burst_frames_per_s']:9.0f} frames/s  {r['burst_exits_per_frame']:.3f} "
              f"data-path exits/frame  {r['burst_exits']} exits in {r['burst_seconds']:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
