/* virtwire kvm guest: a small driver for the classic RTL8139 (10ec:8139, revision < 0x20), the
 * "full virtualization" NIC: every register access below is a vCPU exit to the VMM.
 *
 * Included by guest.c (one translation unit). Shape of Linux's 8139too, reduced: the memory BAR
 * (BAR1) holds the register file; reset through CR.RST; the MAC from IDR0-5; one RX ring of
 * 32 KiB at RBSTART with RCR.WRAP set (a frame runs on past the end, into padding), consumed at
 * cur_rx and acknowledged by writing CAPR = cur_rx - 16 while CR.BUFE reads 0; TX through the
 * four TSAD/TSD pairs in round robin (TSADn fixed at init, a TSDn write with the size and OWN
 * clear hands the buffer to the chip; it is free again once TSDn shows TOK, TUN or TABT);
 * interrupts through IMR/ISR (the handler reads ISR and writes the bits back, which lowers the
 * line, before the PIC's EOI). */

#define RTL_RING 0x300000u
#define RTL_RING_LEN 32768u
#define RTL_TXBUF 0x500000u
#define RTL_TSD(i) (rtl + 0x10 + 4 * ((i) & 3))

static u32 rtl;                       /* MMIO base of the register file (BAR1); 0: not in use */
static u32 rtl_cur_rx, rtl_cur_tx, rtl_dirty_tx;

static void on_frame(u8 *f, u32 len);

static void rtl_irq(void) {
    if (!rtl) return;
    u16 s = rd16(rtl + 0x3e);         /* ISR */
    if (s) wr16(rtl + 0x3e, s);       /* write-one-to-clear: lowers INTx */
    isr_bits |= s;
}

static void rtl_tx_reclaim(void) {
    while (rtl_dirty_tx != rtl_cur_tx) {
        u32 t = rd32(RTL_TSD(rtl_dirty_tx));
        if (!(t & (0x8000u | 0x4000u | 0x40000000u))) break; /* TOK | TUN | TABT */
        rtl_dirty_tx++;
    }
}

static u8 *rtl_tx_slot(void) {
    while (rtl_cur_tx - rtl_dirty_tx >= 4 && !P->stop) {
        u32 seen = dev_irqs;
        rtl_tx_reclaim();
        if (rtl_cur_tx - rtl_dirty_tx < 4) break;
        WAIT_UNTIL(dev_irqs != seen || P->stop);
    }
    return (u8 *)(RTL_TXBUF + 2048 * (rtl_cur_tx & 3));
}

static void rtl_send(u32 len) {
    if (len < 60) len = 60;
    wr32(RTL_TSD(rtl_cur_tx), len);   /* size, early-TX threshold 0, OWN clear: go */
    rtl_cur_tx++; tx_frames++; kicks++;
}

static void rtl_rx_poll(void) {
    while (!(rd8(rtl + 0x37) & 1)) {  /* CR.BUFE clear: a frame is in the ring */
        u32 off = rtl_cur_rx % RTL_RING_LEN;
        u32 hdr = rd32(RTL_RING + off), status = hdr & 0xffff, len = hdr >> 16;
        if (!(status & 1) || len < 64 || len > 1792 + 4) {
            line("rtl8139 rx error status=0x"); hex(status, 4); puts_(" len="); dec(len);
            putc_('\n');
            rtl_cur_rx = rd16(rtl + 0x3a); /* CBR: drop what is there */
            wr16(rtl + 0x38, (u16)(rtl_cur_rx - 16));
            return;
        }
        on_frame((u8 *)(RTL_RING + off + 4), len - 4);
        rtl_cur_rx = (rtl_cur_rx + len + 4 + 3) & ~3u;
        wr16(rtl + 0x38, (u16)(rtl_cur_rx - 16)); /* CAPR */
    }
}

static int rtl_init(u32 dev) {
    assign_bars(dev, 0);
    cfg_wr16(dev, 0x04, 0x0007);      /* I/O, memory, bus master */
    rtl = bar_base[1];
    if (!rtl) { line("rtl8139: no memory BAR\n"); return 0; }
    wr8(rtl + 0x37, 0x10);            /* CR.RST */
    for (int i = 0; i < 1000 && (rd8(rtl + 0x37) & 0x10); i++) ;
    for (int i = 0; i < 6; i++) mac[i] = rd8(rtl + i);
    line("mac=");
    for (int i = 0; i < 6; i++) { hex(mac[i], 2); if (i < 5) putc_(':'); }
    putc_('\n');
    wr32(rtl + 0x30, RTL_RING);       /* RBSTART */
    wr8(rtl + 0x37, 0x0c);            /* CR: RE | TE */
    wr32(rtl + 0x44, (2u << 11) | (7u << 8) | 0x80 | 0x0e); /* RCR: 32K, WRAP, AB AM APM */
    wr32(rtl + 0x40, (3u << 24) | (6u << 8));               /* TCR: IFG, MXDMA */
    for (u32 i = 0; i < 4; i++) wr32(rtl + 0x20 + 4 * i, RTL_TXBUF + 2048 * i); /* TSADn */
    rtl_cur_rx = rtl_cur_tx = rtl_dirty_tx = 0;
    wr16(rtl + 0x38, 0xfff0);         /* CAPR = cur_rx - 16 */
    wr32(rtl + 0x4c, 0);              /* MPC */
    wr16(rtl + 0x3c, 0x007f);         /* IMR: ROK RER TOK TER RXOVW PUN FOVW */
    line("rtl8139 cr=0x"); hex(rd8(rtl + 0x37), 2); puts_(" DRIVER_OK\n");
    return 1;
}

static void rtl_burst(void) {
    u32 n = P->burst_count, size = P->burst_size;
    if (size < 60) size = 60;
    if (size > 1514) size = 1514;
    for (u32 i = 0; i < 4; i++) {     /* a template per buffer: broadcast, ethertype 0x88b5 */
        u8 *o = (u8 *)(RTL_TXBUF + 2048 * i);
        zero(o, 2048);
        for (int k = 0; k < 6; k++) o[k] = 0xff;
        copy(o + 6, mac, 6); o[12] = 0x88; o[13] = 0xb5;
    }
    for (u32 seq = 0; seq < n && !P->stop; seq++) {
        u8 *o = rtl_tx_slot();
        *(u32 *)(o + 14) = seq;
        rtl_send(size);
    }
    while (rtl_dirty_tx != rtl_cur_tx && !P->stop) {
        u32 seen = dev_irqs;
        rtl_tx_reclaim();
        if (rtl_dirty_tx == rtl_cur_tx) break;
        WAIT_UNTIL(dev_irqs != seen || P->stop);
    }
}

static int rtl_main(u32 dev) {
    if (!rtl_init(dev)) return ST_INIT_FAILED;
    line("ready ip="); for (int i = 0; i < 4; i++) { dec(P->ip[i]); if (i < 3) putc_('.'); }
    putc_('\n');
    if (P->mode == MODE_BURST) {
        rtl_burst();
    } else {
        u32 seen = dev_irqs - 1;      /* the first pass polls */
        while (!P->stop) {            /* registers only after a device interrupt, not a tick */
            if (dev_irqs != seen) { seen = dev_irqs; rtl_rx_poll(); rtl_tx_reclaim(); }
            WAIT_UNTIL(dev_irqs != seen || P->stop);
        }
    }
    return ST_OK;
}
