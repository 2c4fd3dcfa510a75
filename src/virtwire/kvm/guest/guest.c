/* virtwire kvm guest: a freestanding virtio-net PCI driver that answers ARP and ICMP echo.
 *
 * It does, in the seed's order, what Linux's virtio_pci + virtio_net do: enumerate bus 0 through
 * configuration mechanism #1 (0xCF8/0xCFC), find vendor 0x1AF4, size and assign the BARs, walk
 * the virtio capabilities (modern 0x1041) or use the legacy I/O BAR (transitional 0x1000), reset,
 * ACKNOWLEDGE, DRIVER, negotiate features, FEATURES_OK and re-read it, create the split rings in
 * its RAM, DRIVER_OK; then receive and transmit frames with INTx interrupts through the in-kernel
 * 8259 PIC (level-triggered via ELCR; the ISR read lowers the line, then EOI).
 *
 * This code runs at CPL0, which this host's KVM *emulates* (1-2 M instructions/s): per-frame work
 * is kept to a few dozen instructions (replies are edited in place, copies use rep movs).
 * Build: -m32 -ffreestanding -mgeneral-regs-only -mno-popcnt -fno-pic -nostdlib -O2. */
#include "vw.h"

#define barrier() __asm__ volatile("" ::: "memory")
static inline void outb(u16 p, u8 v) { __asm__ volatile("outb %0,%1" ::"a"(v), "Nd"(p)); }
static inline void outw(u16 p, u16 v) { __asm__ volatile("outw %0,%1" ::"a"(v), "Nd"(p)); }
static inline void outl(u16 p, u32 v) { __asm__ volatile("outl %0,%1" ::"a"(v), "Nd"(p)); }
static inline u8 inb(u16 p) { u8 v; __asm__ volatile("inb %1,%0" : "=a"(v) : "Nd"(p)); return v; }
static inline u16 inw(u16 p) { u16 v; __asm__ volatile("inw %1,%0" : "=a"(v) : "Nd"(p)); return v; }
static inline u32 inl(u16 p) { u32 v; __asm__ volatile("inl %1,%0" : "=a"(v) : "Nd"(p)); return v; }
static inline u8 rd8(u32 a) { return *(volatile u8 *)a; }
static inline u16 rd16(u32 a) { return *(volatile u16 *)a; }
static inline u32 rd32(u32 a) { return *(volatile u32 *)a; }
static inline void wr8(u32 a, u8 v) { *(volatile u8 *)a = v; }
static inline void wr16(u32 a, u16 v) { *(volatile u16 *)a = v; }
static inline void wr32(u32 a, u32 v) { *(volatile u32 *)a = v; }
static void copy(void *d, const void *s, u32 n) {
    __asm__ volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(n) : : "memory");
}
static void zero(void *d, u32 n) {
    __asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(0) : "memory");
}

static struct vw_params *const P = (struct vw_params *)VW_PARAMS;

/* ---- console ---------------------------------------------------------------------------- */
static void putc_(char c) { outb(PORT_COM1, (u8)c); }
static void puts_(const char *s) { while (*s) putc_(*s++); }
static void hex(u32 v, int digits) {
    for (int i = digits - 1; i >= 0; i--) putc_("0123456789abcdef"[(v >> (4 * i)) & 15]);
}
static void dec(u32 v) {
    char b[12]; int n = 0;
    do { b[n++] = (char)('0' + v % 10); v /= 10; } while (v);
    while (n) putc_(b[--n]);
}
static void line(const char *s) { puts_("vwguest: "); puts_(s); }

/* ---- interrupts (8259 PIC, in the kernel) ------------------------------------------------- */
struct gate { u16 lo, sel; u8 zero, type; u16 hi; } __attribute__((packed));
static struct gate idt[48];
extern const u32 vw_exc_stubs[32], vw_irq_stubs[16];
static volatile u32 ticks, dev_irqs, isr_bits;
static u32 dev_irq = 10;
static u32 isr_addr; /* modern: MMIO address of the ISR byte */
static u16 io_base;  /* legacy: I/O BAR */
static int legacy;
static u32 rtl_regs; /* RTL8139: its register file is in use (rtl8139.c) */
static void rtl_irq(void);

static void set_gate(int v, u32 fn) {
    idt[v].lo = (u16)fn; idt[v].hi = (u16)(fn >> 16); idt[v].sel = 0x08;
    idt[v].zero = 0; idt[v].type = 0x8e;
}

static void pic_init(u32 irq) {
    outb(0x20, 0x11); outb(0xa0, 0x11);      /* ICW1: edge (ELCR below), cascade, ICW4 */
    outb(0x21, 0x20); outb(0xa1, 0x28);      /* ICW2: vectors 0x20 and 0x28 */
    outb(0x21, 0x04); outb(0xa1, 0x02);      /* ICW3: slave on IRQ2 */
    outb(0x21, 0x01); outb(0xa1, 0x01);      /* ICW4: 8086 mode */
    u16 mask = (u16)~((1u << 0) | (1u << 2) | (1u << irq));
    outb(0x21, (u8)mask); outb(0xa1, (u8)(mask >> 8));
    u16 elcr = (u16)(1u << irq);             /* INTx is level-triggered */
    outb(0x4d0, (u8)elcr); outb(0x4d1, (u8)(elcr >> 8));
    outb(0x43, 0x34); outb(0x40, 0x9c); outb(0x40, 0x2e); /* PIT: 100 Hz (11932) */
}

static void idt_init(void) {
    for (int v = 0; v < 32; v++) set_gate(v, vw_exc_stubs[v]);
    for (int i = 0; i < 16; i++) set_gate(0x20 + i, vw_irq_stubs[i]);
    struct { u16 limit; u32 base; } __attribute__((packed)) d = { sizeof(idt) - 1, (u32)idt };
    __asm__ volatile("lidt %0" ::"m"(d));
}

void vw_irq(u32 irq) {
    if (irq == dev_irq) {
        if (rtl_regs) rtl_irq();
        else isr_bits |= legacy ? inb(io_base + 19) : rd8(isr_addr); /* lowers the line */
        dev_irqs++;
    } else if (irq == 0) {
        ticks++;
    } else if (irq == 7 || irq == 15) {
        return; /* spurious: no EOI */
    }
    if (irq >= 8) outb(0xa0, 0x20);
    outb(0x20, 0x20);
}

volatile u32 int3_next;

void vw_exception(u32 vector, u32 *frame) {
    line("exception vector="); dec(vector); puts_(" eip=0x");
    int errcode = vector == 8 || (vector >= 10 && vector <= 14) || vector == 17;
    hex(frame[errcode ? 2 : 1], 8);
    if (vector == 3) { puts_(" int3_next=0x"); hex(int3_next, 8); }
    putc_('\n');
    outl(PORT_EXIT, 0x56570000u | ST_EXCEPTION);
    for (;;) __asm__ volatile("cli; hlt");
}

/* Wait for an interrupt unless ``ready`` already holds (sti;hlt is atomic: no lost wake-up). */
#define WAIT_UNTIL(ready) do { __asm__ volatile("cli"); \
    if (!(ready)) __asm__ volatile("sti; hlt" ::: "memory"); else __asm__ volatile("sti"); \
    } while (0)

/* ---- PCI (configuration mechanism #1) --------------------------------------------------- */
static u32 cfg_addr(u32 dev, u32 off) { return 0x80000000u | (dev << 11) | (off & 0xfc); }
static u32 cfg_rd32(u32 dev, u32 off) { outl(0xcf8, cfg_addr(dev, off)); return inl(0xcfc); }
static u8 cfg_rd8(u32 dev, u32 off) {
    outl(0xcf8, cfg_addr(dev, off)); return inb((u16)(0xcfc + (off & 3)));
}
static void cfg_wr32(u32 dev, u32 off, u32 v) { outl(0xcf8, cfg_addr(dev, off)); outl(0xcfc, v); }
static void cfg_wr16(u32 dev, u32 off, u16 v) {
    outl(0xcf8, cfg_addr(dev, off)); outw((u16)(0xcfc + (off & 2)), v);
}

static u32 bar_base[6], bar_size[6];
static u32 next_mem = 0xe0000000u, next_io = 0xc000;

static void assign_bars(u32 dev, int hostile) {
    for (int i = 0; i < 6; i++) {
        u32 off = 0x10 + 4 * i, old = cfg_rd32(dev, off);
        cfg_wr32(dev, off, 0xffffffffu);
        u32 probe = cfg_rd32(dev, off);
        if (!probe || probe == 0xffffffffu) { cfg_wr32(dev, off, old); continue; }
        int io = probe & 1;
        u32 size = ~(probe & (io ? ~3u : ~15u)) + 1;
        if (io) size &= 0xffff;
        u32 *next = io ? &next_io : &next_mem;
        u32 base = (*next + size - 1) & ~(size - 1);
        if (hostile) base = io ? 0x3f8 : 0x1000; /* over the UART / over RAM, misaligned */
        *next = base + size;
        cfg_wr32(dev, off, base | (probe & (io ? 1 : 0)));
        bar_base[i] = cfg_rd32(dev, off) & (io ? ~3u : ~15u);
        bar_size[i] = size;
        line("bar"); dec((u32)i); puts_(io ? " io=0x" : " mem=0x"); hex(bar_base[i], 8);
        puts_(" size=0x"); hex(size, 0 + 8); putc_('\n');
    }
}

/* ---- virtio ----------------------------------------------------------------------------- */
struct desc { u64 addr; u32 len; u16 flags, next; };
struct vq { u32 size, notify; struct desc *d; volatile u16 *avail; volatile u16 *used;
            u16 avail_idx, used_seen; u32 buf; };
#define AVAIL_IDX(q) ((q)->avail[1])
#define AVAIL_RING(q, i) ((q)->avail[2 + (i)])
#define USED_IDX(q) ((q)->used[1])
#define USED_ID(q, i) (*(volatile u32 *)((u32)(q)->used + 4 + 8 * (i)))
#define USED_LEN(q, i) (*(volatile u32 *)((u32)(q)->used + 8 + 8 * (i)))

static u32 common, notify_base, notify_mult, devcfg;
static struct vq rxq, txq;
static u32 hdr_len;
static u8 mac[6];
static u32 tx_frames, rx_frames, arp_replies, icmp_replies, kicks;

static u8 st_read(void) { return legacy ? inb(io_base + 18) : rd8(common + 20); }
static void st_write(u8 v) { if (legacy) outb(io_base + 18, v); else wr8(common + 20, v); }

static int find_caps(u32 dev) {
    if (!(cfg_rd32(dev, 0x04) & (1u << 20))) return 0;
    u32 p = cfg_rd8(dev, 0x34) & 0xfc;
    for (int n = 0; p && n < 48; n++) {
        if (cfg_rd8(dev, p) == 0x09) {
            u32 type = cfg_rd8(dev, p + 3), bar = cfg_rd8(dev, p + 4);
            u32 addr = (bar < 6 ? bar_base[bar] : 0) + cfg_rd32(dev, p + 8);
            line("cap type="); dec(type); puts_(" bar="); dec(bar); puts_(" addr=0x");
            hex(addr, 8); putc_('\n');
            if (type == 1) common = addr;
            else if (type == 2) { notify_base = addr; notify_mult = cfg_rd32(dev, p + 16); }
            else if (type == 3) isr_addr = addr;
            else if (type == 4) devcfg = addr;
        }
        p = cfg_rd8(dev, p + 1) & 0xfc;
    }
    return common && notify_base && isr_addr;
}

static u32 ring_mem = 0x200000;

static int setup_queue(struct vq *q, u32 index, u32 buf, int hostile) {
    u32 base = ring_mem, size;
    ring_mem += 0x10000;
    if (legacy) {
        outw(io_base + 14, (u16)index);
        size = inw(io_base + 12);
    } else {
        wr16(common + 22, (u16)index);
        size = rd16(common + 24);
        u32 want = P->queue_size ? P->queue_size : 64;
        if (size > want) { size = want; wr16(common + 24, (u16)size); }
    }
    if (!size || size > 256 || (size & (size - 1))) return 0;
    q->size = size; q->buf = buf;
    q->d = (struct desc *)base;
    q->avail = (volatile u16 *)(base + 16 * size);
    u32 used = (base + 16 * size + 6 + 2 * size + 4095) & ~4095u;
    q->used = (volatile u16 *)used;
    zero((void *)base, used + 6 + 8 * size - base);
    q->avail_idx = q->used_seen = 0;
    u32 d = hostile ? 0xf0000000u : base;
    if (legacy) {
        outl(io_base + 8, d >> 12);
        q->notify = index;
    } else {
        wr32(common + 32, d); wr32(common + 36, 0);
        wr32(common + 40, hostile ? d + 0x1000 : (u32)q->avail); wr32(common + 44, 0);
        wr32(common + 48, hostile ? d + 0x2000 : used); wr32(common + 52, 0);
        q->notify = notify_base + rd16(common + 30) * notify_mult;
        wr16(common + 28, 1);
    }
    line("queue index="); dec(index); puts_(" size="); dec(size); puts_(" desc=0x");
    hex(d, 8); puts_(" used=0x"); hex(used, 8); putc_('\n');
    return 1;
}

static void kick(struct vq *q, u32 index) {
    kicks++;
    if (legacy) outw(io_base + 16, (u16)index); else wr16(q->notify, (u16)index);
}

static int negotiate(void) {
    u32 f0, f1 = 0;
    if (legacy) {
        f0 = inl(io_base + 0);
    } else {
        wr32(common + 0, 0); f0 = rd32(common + 4);
        wr32(common + 0, 1); f1 = rd32(common + 4);
    }
    u32 w0 = f0 & (1u << 5), w1 = f1 & 1u; /* MAC; VERSION_1 */
    line("features device=0x"); hex(f1, 8); hex(f0, 8);
    puts_(" driver=0x"); hex(w1, 8); hex(w0, 8); putc_('\n');
    if (legacy) { outl(io_base + 4, w0); return 1; }
    if (!w1) return 0;
    wr32(common + 8, 0); wr32(common + 12, w0);
    wr32(common + 8, 1); wr32(common + 12, w1);
    st_write(1 | 2 | 8);
    if (!(st_read() & 8)) { line("FEATURES_OK not accepted\n"); return 0; }
    line("negotiated features=0x"); hex(w1, 8); hex(w0, 8); puts_(" features_ok=1\n");
    return 1;
}

static void read_mac(void) {
    for (int i = 0; i < 6; i++) mac[i] = legacy ? inb(io_base + 20 + i) : rd8(devcfg + i);
    line("mac=");
    for (int i = 0; i < 6; i++) { hex(mac[i], 2); if (i < 5) putc_(':'); }
    putc_('\n');
}

static void rx_post(struct vq *q, u32 id) {
    AVAIL_RING(q, q->avail_idx & (q->size - 1)) = (u16)id;
    q->avail_idx++;
}

static void rx_fill(void) {
    for (u32 i = 0; i < rxq.size; i++) {
        rxq.d[i].addr = rxq.buf + 2048 * i; rxq.d[i].len = 2048; rxq.d[i].flags = 2;
        rx_post(&rxq, i);
    }
    barrier(); AVAIL_IDX(&rxq) = rxq.avail_idx; barrier();
    kick(&rxq, 0);
}

/* Reclaim transmitted buffers; returns how many slots are free. */
static u32 tx_free(void) {
    txq.used_seen = USED_IDX(&txq);
    return txq.size - (u16)(txq.avail_idx - txq.used_seen);
}

/* Queue one frame (header + ``len`` bytes at the slot's buffer, already written). */
static void tx_queue(u32 len) {
    u32 slot = txq.avail_idx & (txq.size - 1);
    txq.d[slot].len = hdr_len + len;
    AVAIL_RING(&txq, slot) = (u16)slot;
    txq.avail_idx++;
    tx_frames++;
}

static void tx_publish(void) { barrier(); AVAIL_IDX(&txq) = txq.avail_idx; barrier(); kick(&txq, 1); }

static u8 *tx_slot(void) {
    while (!tx_free()) WAIT_UNTIL(USED_IDX(&txq) != txq.used_seen || P->stop);
    return (u8 *)(txq.buf + 2048 * (txq.avail_idx & (txq.size - 1)) + hdr_len);
}

static void tx_init(void) {
    for (u32 i = 0; i < txq.size; i++) {
        txq.d[i].addr = txq.buf + 2048 * i; txq.d[i].flags = 0;
        zero((void *)(txq.buf + 2048 * i), hdr_len);
    }
}

#include "rtl8139.c"

static u8 *nic_slot(void) { return rtl ? rtl_tx_slot() : tx_slot(); }
static void nic_send(u32 len) { if (rtl) rtl_send(len); else { tx_queue(len); tx_publish(); } }

/* ---- ARP / ICMP ------------------------------------------------------------------------- */
static int ip_eq(const u8 *a) { return *(const u32 *)a == *(const u32 *)P->ip; }

static void on_frame(u8 *f, u32 len) {
    rx_frames++;
    if (len < 42) return;
    u16 type = (u16)(f[12] << 8 | f[13]);
    if (type == 0x0806 && f[20] == 0 && f[21] == 1 && ip_eq(f + 38)) {
        u8 *o = nic_slot();
        copy(o, f + 6, 6); copy(o + 6, mac, 6); copy(o + 12, f + 12, 10);
        o[21] = 2;
        copy(o + 22, mac, 6); copy(o + 28, P->ip, 4);
        copy(o + 32, f + 22, 10);
        nic_send(42); arp_replies++;
    } else if (type == 0x0800 && f[23] == 1 && ip_eq(f + 30)) {
        u32 ihl = (f[14] & 15) * 4, ip_len = (u32)(f[16] << 8 | f[17]);
        u8 *icmp = f + 14 + ihl;
        if (ihl < 20 || 14 + ip_len > len || 14 + ihl + 8 > len || icmp[0] != 8) return;
        if (14 + ip_len > 1514) return;
        u8 *o = nic_slot();
        copy(o, f + 6, 6); copy(o + 6, mac, 6); copy(o + 12, f + 12, 14 + ip_len - 12);
        copy(o + 26, f + 30, 4); copy(o + 30, f + 26, 4);
        u8 *r = o + 14 + ihl;
        r[0] = 0;
        u32 sum = (u32)(r[2] << 8 | r[3]) + 0x0800; /* type 8 -> 0: RFC 1624 update */
        sum = (sum & 0xffff) + (sum >> 16);
        r[2] = (u8)(sum >> 8); r[3] = (u8)sum;
        nic_send(14 + ip_len); icmp_replies++;
    }
}

static void rx_poll(void) {
    u16 idx = USED_IDX(&rxq);
    if (idx == rxq.used_seen) return;
    while (rxq.used_seen != idx) {
        u32 e = rxq.used_seen & (rxq.size - 1);
        u32 id = USED_ID(&rxq, e), len = USED_LEN(&rxq, e);
        if (id < rxq.size && len > hdr_len && len <= 2048)
            on_frame((u8 *)(rxq.buf + 2048 * id + hdr_len), len - hdr_len);
        rx_post(&rxq, id < rxq.size ? id : 0);
        rxq.used_seen++;
    }
    barrier(); AVAIL_IDX(&rxq) = rxq.avail_idx; barrier();
    kick(&rxq, 0);
}

static void burst(void) {
    u32 n = P->burst_count, size = P->burst_size;
    if (size < 60) size = 60;
    if (size > 1514) size = 1514;
    for (u32 i = 0; i < txq.size; i++) { /* a template per slot: broadcast, ethertype 0x88b5 */
        u8 *o = (u8 *)(txq.buf + 2048 * i + hdr_len);
        for (int k = 0; k < 6; k++) o[k] = 0xff;
        copy(o + 6, mac, 6); o[12] = 0x88; o[13] = 0xb5;
    }
    u32 seq = 0;
    while (seq < n && !P->stop) {
        u32 free = tx_free();
        if (!free) { WAIT_UNTIL(USED_IDX(&txq) != txq.used_seen || P->stop); continue; }
        for (; free && seq < n; free--, seq++) {
            u8 *o = (u8 *)(txq.buf + 2048 * (txq.avail_idx & (txq.size - 1)) + hdr_len);
            *(u32 *)(o + 14) = seq;
            tx_queue(size);
        }
        tx_publish();
    }
    while ((u16)(txq.avail_idx - USED_IDX(&txq)) && !P->stop)
        WAIT_UNTIL(USED_IDX(&txq) == txq.avail_idx || P->stop);
}

static void garbage(void) {
    for (u32 p = 0; p < 0x10000; p++) outb((u16)p, 0xa5);
    for (u32 p = 0; p < 0x10000; p += 2) (void)inw((u16)p);
    for (u32 a = 0xc0000000u; a; a += 0x10000) { wr32(a, 0xa5a5a5a5u); (void)rd32(a + 4); }
    line("hostile garbage done\n");
}

static void report(void) {
    line("report tx="); dec(tx_frames); puts_(" rx="); dec(rx_frames);
    puts_(" arp="); dec(arp_replies); puts_(" icmp="); dec(icmp_replies);
    puts_(" kicks="); dec(kicks); puts_(" irqs="); dec(dev_irqs);
    puts_(" ticks="); dec(ticks); putc_('\n');
}

static u32 find_device(void) {
    for (u32 dev = 0; dev < 32; dev++) {
        u32 id = cfg_rd32(dev, 0);
        if (id == 0xffffffffu) continue;
        if ((id & 0xffff) != 0x1af4 && id != 0x813910ecu) continue;
        if (id == 0x813910ecu && (cfg_rd32(dev, 8) & 0xff) >= 0x20) continue; /* C+: not ours */
        u32 cls = cfg_rd32(dev, 8) >> 8;
        line("device id="); hex(id & 0xffff, 4); putc_(':'); hex(id >> 16, 4); puts_(" class="); hex(cls, 6);
        puts_(" slot="); dec(dev); puts_(" irq="); dec(cfg_rd8(dev, 0x3c));
        puts_(" pin="); dec(cfg_rd8(dev, 0x3d)); putc_('\n');
        return dev | (id & 0xffff0000u);
    }
    return 0xffffffffu;
}

static int device_init(u32 dev, u32 mode) {
    legacy = (dev >> 16) == 0x1000;
    dev &= 0xffff;
    assign_bars(dev, mode == MODE_BADBAR);
    cfg_wr16(dev, 0x04, 0x0007); /* I/O, memory, bus master */
    if (legacy) {
        io_base = (u16)bar_base[0];
    } else if (!find_caps(dev)) {
        line("virtio capabilities missing\n");
        return ST_INIT_FAILED;
    }
    hdr_len = legacy ? 10 : 12;
    st_write(0);
    if (st_read() != 0) { line("reset did not read back 0\n"); return ST_INIT_FAILED; }
    st_write(1); st_write(1 | 2);
    if (!negotiate()) return ST_INIT_FAILED;
    if (!setup_queue(&rxq, 0, 0x300000, 0) ||
        !setup_queue(&txq, 1, 0x500000, mode == MODE_BADRING)) {
        line("queue set-up failed\n");
        return ST_INIT_FAILED;
    }
    st_write(legacy ? (1 | 2 | 4) : (1 | 2 | 8 | 4));
    u8 st = st_read();
    line("status=0x"); hex(st, 2); puts_(st & 0x40 ? " NEEDS_RESET\n" : " DRIVER_OK\n");
    return st & 0x40 ? ST_NEEDS_RESET : ST_OK;
}

int vw_main(void) {
    if (P->magic != VW_MAGIC) { puts_("vwguest: no parameter block\n"); return ST_BAD_PARAMS; }
    dev_irq = P->irq & 15;
    idt_init();
    pic_init(dev_irq);
    line("start mode="); dec(P->mode); putc_('\n');
    if (P->mode == MODE_BADINSN) {
        line("executing popcnt\n");
        __asm__ volatile(".byte 0xf3, 0x0f, 0xb8, 0xc0" ::: "eax"); /* popcnt %eax,%eax */
        return ST_HOSTILE_DONE;
    }
    if (P->mode == MODE_INT3) {
        /* #BP is a trap: the handler must see the address after the int3 */
        __asm__ volatile("movl $1f, int3_next\n\tint3\n1:" ::: "memory");
        return ST_HOSTILE_DONE; /* not reached: vw_exception reports vector 3 */
    }
    if (P->mode == MODE_EXITS) {
        for (u32 i = 0; i < P->exits_count; i++) outl(PORT_BENCH, i);
        return ST_OK;
    }
    if (P->mode == MODE_GARBAGE) { garbage(); return ST_HOSTILE_DONE; }
    u32 dev = find_device();
    if (dev == 0xffffffffu) { line("no virtio device on bus 0\n"); return ST_NO_DEVICE; }
    __asm__ volatile("sti");
    if ((dev >> 16) == 0x8139) {
        rtl_regs = 1;
        int rst = rtl_main(dev & 0xffff);
        if (!rst) report();
        return rst;
    }
    int st = device_init(dev, P->mode);
    if (st == ST_NEEDS_RESET) {
        kick(&txq, 1);
        for (int i = 0; i < 3; i++) kick(&rxq, 0);
    }
    if (st) return st;
    read_mac();
    tx_init();
    rx_fill();
    line("ready ip="); for (int i = 0; i < 4; i++) { dec(P->ip[i]); if (i < 3) putc_('.'); }
    putc_('\n');
    if (P->mode == MODE_BURST) {
        burst();
    } else {
        while (!P->stop) {
            rx_poll();
            WAIT_UNTIL(USED_IDX(&rxq) != rxq.used_seen || P->stop);
        }
    }
    report();
    return ST_OK;
}
