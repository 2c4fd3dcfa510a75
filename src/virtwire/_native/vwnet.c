/*
 * virtwire native batch helper: the TX and RX fast paths (split and packed rings) of the
 * virtio-net device.
 *
 * Theory of operation
 * -------------------
 * (The RX direction, vw_split_rx_burst() and vw_packed_rx_burst(), is described where it
 * starts, further down.)
 *
 * vw_split_tx_burst() consumes available TX chains of a split virtqueue (virtio 1.2 §2.7) that
 * are the common case -- readable descriptors (direct NEXT links or one indirect table,
 * §2.7.5.3) holding virtio_net_hdr plus frame, the whole header in the first one, and either no
 * offload fields or offloads the backend takes and the header rules allow -- hands each frame
 * to the backend (writev() on a TAP fd, or nothing for the null backend), writes a used
 * element {head, 0} per chain and stores used->idx once at the end. It stops, WITHOUT
 * consuming, at the first chain that is anything else (WRITE or nested INDIRECT flags, a
 * buffer outside guest RAM, a loop, a header it does not accept, a runt or oversize frame, a
 * bad head index) or when the TAP is full: the Python
 * path then handles that chain with its full checks, counters and error reporting. So this
 * code never decides that a guest is wrong; it only ever takes the easy cases.
 *
 * Every guest value is bounds-checked here before use: the avail index distance (<= size),
 * each head (< size), each buffer against the guest RAM regions the caller passes.
 *
 * Memory order (x86-64, TSO): avail->idx is read once, then a compiler barrier before ring
 * entries are read; used elements are written before the used->idx store, separated by a
 * compiler barrier (stores are not reordered with stores on x86). On other architectures the
 * __atomic builtins below give the acquire/release ordering.
 */
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>

typedef struct {
    uint64_t gpa;
    uint64_t size;
    uint8_t *host;
} vw_region;

typedef struct {
    uint8_t *desc;   /* host address of the descriptor table */
    uint8_t *avail;  /* host address of the available ring */
    uint8_t *used;   /* host address of the used ring */
    uint32_t size;   /* queue size, a power of two */
    uint16_t next_avail;
    uint16_t next_used;
} vw_split;

typedef struct {
    uint64_t frames;
    uint64_t bytes;
    uint64_t errors;  /* frames the kernel refused (consumed and counted, as the Python path) */
    uint64_t gso;     /* frames with a GSO header (segmentation left to the backend) */
    int32_t stop;     /* 0 ring empty / limit, 1 complex chain, 2 backend full, 3 bad ring */
} vw_result;

#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2
#define VIRTQ_DESC_F_INDIRECT 4
#define MAX_FRAME (65535 + 14 + 4)

static inline uint8_t *translate(const vw_region *r, int n, uint64_t gpa, uint64_t len) {
    for (int i = 0; i < n; i++) {
        if (gpa >= r[i].gpa && len <= r[i].size && gpa - r[i].gpa <= r[i].size - len)
            return r[i].host + (gpa - r[i].gpa);
    }
    return 0;
}

/* Header check for a backend that takes offloads (TAP): the rules of net/header.py's
 * check_tx_header(); any doubt -> 0 and the Python path decides (and counts). */
#define F_CSUM (1ull << 0)
#define F_HOST_TSO4 (1ull << 11)
#define F_HOST_TSO6 (1ull << 12)
#define F_HOST_ECN (1ull << 13)
static int hdr_ok(const uint8_t *h, uint32_t frame_len, uint64_t features) {
    uint8_t flags = h[0], gso = h[1];
    uint16_t gso_size, csum_start, csum_offset;
    memcpy(&gso_size, h + 4, 2);
    memcpy(&csum_start, h + 6, 2);
    memcpy(&csum_offset, h + 8, 2);
    if (flags & 1) {
        if (!(features & F_CSUM))
            return 0;
        if ((uint32_t)csum_start + csum_offset + 2 > frame_len)
            return 0;
    }
    if (gso) {
        uint8_t base = gso & 0x7f;
        if (base == 1) {
            if (!(features & F_HOST_TSO4))
                return 0;
        } else if (base == 4) {
            if (!(features & F_HOST_TSO6))
                return 0;
        } else {
            return 0;
        }
        if ((gso & 0x80) && !(features & F_HOST_ECN))
            return 0;
        if (!(flags & 1) || gso_size == 0)
            return 0;
    }
    return 1;
}

#define MAX_IOV 64
#define MAX_INDIRECT 1024u  /* entries of one indirect table (chain.py MAX_CHAIN_SEGMENTS) */

/* Append the readable segment [addr, addr+len) of guest memory to iov (nothing for len 0).
 * Returns 0, or -1 if it is not inside one region. The caller bounds *niov below MAX_IOV. */
static int add_seg(const vw_region *regs, int nregs, uint64_t addr, uint32_t len,
                   struct iovec *iov, int *niov, long *total) {
    if (!len)
        return 0;
    uint8_t *p = translate(regs, nregs, addr, len);
    if (!p)
        return -1;
    iov[*niov].iov_base = p;
    iov[*niov].iov_len = len;
    (*niov)++;
    *total += len;
    return 0;
}

/* Walk one chain (direct NEXT links or one indirect table); fill iov with host segments.
 * Returns the total length, or -1 if the chain is not a simple readable one we take here. */
static long walk(const vw_split *q, const vw_region *regs, int nregs, uint16_t head,
                 int indirect_ok, struct iovec *iov, int *niov) {
    const uint8_t *table = q->desc;
    uint32_t entries = q->size, i = head, ttl = q->size;
    long total = 0;
    int n = 0;
    uint64_t addr;
    uint32_t len;
    uint16_t flags, next;
    memcpy(&addr, table + 16 * i, 8);
    memcpy(&len, table + 16 * i + 8, 4);
    memcpy(&flags, table + 16 * i + 12, 2);
    if (flags & VIRTQ_DESC_F_INDIRECT) {
        /* at most 1024 entries, as the Python path and QEMU (issue 14, defect 10) */
        if (!indirect_ok || (flags & (VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE)) || len == 0 ||
            len % 16 || len / 16 > MAX_INDIRECT)
            return -1;
        table = translate(regs, nregs, addr, len);
        if (!table)
            return -1;
        entries = ttl = len / 16;
        i = 0;
    }
    for (;;) {
        if (ttl-- == 0 || n >= MAX_IOV)
            return -1;
        memcpy(&addr, table + 16 * i, 8);
        memcpy(&len, table + 16 * i + 8, 4);
        memcpy(&flags, table + 16 * i + 12, 2);
        memcpy(&next, table + 16 * i + 14, 2);
        if (flags & (VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_INDIRECT))
            return -1;
        if (add_seg(regs, nregs, addr, len, iov, &n, &total))
            return -1;
        if (!(flags & VIRTQ_DESC_F_NEXT))
            break;
        if (next >= entries)
            return -1;
        i = next;
    }
    *niov = n;
    return total;
}

/* What both ring formats do with one popped chain (``iov``/``niov``, ``total`` bytes, header
 * first): a header with flags or gso_type is taken only when the backend keeps the header and
 * hdr_ok() accepts it; then the frame is written to ``fd`` (without the header unless kept).
 * Returns 0 to go on, else the vw_result.stop code: 1 (chain not taken) or 2 (backend full). */
static int tx_send(struct iovec *iov, int niov, long total, int hdr_len, int fd, int keep_hdr,
                   uint64_t features, vw_result *res) {
    const uint8_t *h = iov[0].iov_base;
    if (h[0] || h[1]) {
        if (!keep_hdr || !features || !hdr_ok(h, (uint32_t)(total - hdr_len), features))
            return 1;
        if (h[1])
            res->gso++;
    }
    if (fd >= 0) {
        struct iovec *v = iov;
        int cnt = niov;
        if (!keep_hdr) {
            if (iov[0].iov_len == (size_t)hdr_len) {
                v++;
                cnt--;
            } else {
                iov[0].iov_base = (uint8_t *)iov[0].iov_base + hdr_len;
                iov[0].iov_len -= hdr_len;
            }
        }
        ssize_t w = writev(fd, v, cnt);
        if (w < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 2;
            res->errors++;
        }
    }
    return 0;
}

/* features: the negotiated feature word if the backend takes offloads (header kept), else 0
 * (then only headers without flags/gso_type are taken). */
int vw_split_tx_burst(vw_split *q, const vw_region *regs, int nregs, int hdr_len, int fd,
                      int keep_hdr, int limit, uint64_t features, int indirect_ok,
                      vw_result *res) {
    uint16_t avail_idx = __atomic_load_n((uint16_t *)(q->avail + 2), __ATOMIC_ACQUIRE);
    uint16_t pending = (uint16_t)(avail_idx - q->next_avail);
    uint32_t mask = q->size - 1;
    int done = 0;
    struct iovec iov[MAX_IOV];
    res->frames = res->bytes = res->errors = res->gso = 0;
    res->stop = 0;
    if (pending > q->size) {
        res->stop = 3;
        return 0;
    }
    if ((int)pending > limit)
        pending = (uint16_t)limit;
    while (done < (int)pending) {
        uint16_t head;
        int niov = 0;
        memcpy(&head, q->avail + 4 + 2 * (q->next_avail & mask), 2);
        if (head >= q->size) {
            res->stop = 3;
            break;
        }
        long total = walk(q, regs, nregs, head, indirect_ok, iov, &niov);
        if (total < 0 || niov == 0 || iov[0].iov_len < (size_t)hdr_len ||
            total < hdr_len + 14 || total > hdr_len + MAX_FRAME) {
            res->stop = 1;
            break;
        }
        int st = tx_send(iov, niov, total, hdr_len, fd, keep_hdr, features, res);
        if (st) {
            res->stop = st;
            break;
        }
        uint8_t *u = q->used + 4 + 8 * (q->next_used & mask);
        uint32_t id = head, zero = 0;
        memcpy(u, &id, 4);
        memcpy(u + 4, &zero, 4);
        q->next_used++;
        q->next_avail++;
        res->frames++;
        res->bytes += total - hdr_len;
        done++;
    }
    if (done)
        __atomic_store_n((uint16_t *)(q->used + 2), q->next_used, __ATOMIC_RELEASE);
    return done;
}

/* ---- packed rings (virtio 1.2 §2.8) ------------------------------------------------------------
 * vw_packed_tx_pop() takes the same simple chains from a packed ring -- a NEXT-linked list of
 * readable descriptors in consecutive slots (§2.8.6) or one indirect table (§2.8.7) -- checks
 * and sends them, and reports each consumed chain's buffer id and slot count; the caller marks
 * them used through the ring object (so the used side stays in one place). It stops, without
 * consuming, at anything else, exactly like the split version. */
typedef struct {
    uint8_t *desc;
    uint32_t size;
    uint16_t next_avail;
    uint16_t avail_wrap;
    uint32_t inflight;
} vw_packed;

#define PK_F_AVAIL (1u << 7)
#define PK_F_USED (1u << 15)
#define PK_MAX_INDIRECT MAX_INDIRECT

static inline int pk_avail(uint16_t flags, int wrap) {
    return (flags & (PK_F_AVAIL | PK_F_USED)) == (wrap ? PK_F_AVAIL : PK_F_USED);
}

int vw_packed_tx_pop(vw_packed *q, const vw_region *regs, int nregs, int hdr_len, int fd,
                     int keep_hdr, int limit, uint64_t features, int indirect_ok,
                     uint16_t *ids, uint16_t *ndescs, vw_result *res) {
    int done = 0;
    struct iovec iov[MAX_IOV];
    res->frames = res->bytes = res->errors = res->gso = 0;
    res->stop = 0;
    while (done < limit) {
        uint32_t slot = q->next_avail, s = slot, n = 1;
        int w = q->avail_wrap;
        const uint8_t *d = q->desc + 16 * s;
        uint64_t addr;
        uint32_t len;
        uint16_t flags, id;
        int niov = 0;
        long total = 0;
        if (slot >= q->size)
            break; /* checked before the slot is read (issue 14, defect 10) */
        memcpy(&flags, d + 14, 2);
        if (!pk_avail(flags, w))
            break; /* nothing (more) available */
        memcpy(&addr, d, 8);
        memcpy(&len, d + 8, 4);
        if (flags & VIRTQ_DESC_F_INDIRECT) {
            if (!indirect_ok || (flags & VIRTQ_DESC_F_NEXT) || len == 0 || len % 16 ||
                len > PK_MAX_INDIRECT * 16) {
                res->stop = 1;
                break;
            }
            const uint8_t *t = translate(regs, nregs, addr, len);
            if (!t) {
                res->stop = 1;
                break;
            }
            int bad = 0;
            for (uint32_t k = 0; k < len / 16; k++) {
                uint64_t a;
                uint32_t l;
                uint16_t f;
                memcpy(&a, t + 16 * k, 8);
                memcpy(&l, t + 16 * k + 8, 4);
                memcpy(&f, t + 16 * k + 14, 2);
                if ((f & (VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_WRITE)) || niov >= MAX_IOV) {
                    bad = 1;
                    break;
                }
                if (add_seg(regs, nregs, a, l, iov, &niov, &total)) {
                    bad = 1;
                    break;
                }
            }
            if (bad) {
                res->stop = 1;
                break;
            }
        } else {
            int bad = 0;
            for (;;) {
                if ((flags & (VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_INDIRECT)) || niov >= MAX_IOV) {
                    bad = 1;
                    break;
                }
                if (add_seg(regs, nregs, addr, len, iov, &niov, &total)) {
                    bad = 1;
                    break;
                }
                if (!(flags & VIRTQ_DESC_F_NEXT))
                    break;
                if (n >= q->size) {
                    bad = 1;
                    break;
                }
                n++;
                if (++s == q->size) {
                    s = 0;
                    w ^= 1;
                }
                d = q->desc + 16 * s;
                memcpy(&flags, d + 14, 2);
                if (!pk_avail(flags, w)) {
                    bad = 1;
                    break;
                }
                memcpy(&addr, d, 8);
                memcpy(&len, d + 8, 4);
            }
            if (bad) {
                res->stop = 1;
                break;
            }
        }
        memcpy(&id, q->desc + 16 * s + 12, 2); /* the id is in the last descriptor (§2.8.6) */
        if (id >= q->size || q->inflight + n > q->size || niov == 0 ||
            iov[0].iov_len < (size_t)hdr_len || total < hdr_len + 14 ||
            total > hdr_len + MAX_FRAME) {
            res->stop = 1;
            break;
        }
        int st = tx_send(iov, niov, total, hdr_len, fd, keep_hdr, features, res);
        if (st) {
            res->stop = st;
            break;
        }
        ids[done] = id;
        ndescs[done] = (uint16_t)n;
        if (++s == q->size) {
            s = 0;
            w ^= 1;
        }
        q->next_avail = (uint16_t)s;
        q->avail_wrap = (uint16_t)w;
        q->inflight += n;
        res->frames++;
        res->bytes += total - hdr_len;
        done++;
    }
    return done;
}

/* ---- split-ring RX (virtio 1.2 §2.7, §5.1.6.3, §5.1.6.4 with MRG_RXBUF) ----------------------
 * vw_split_rx_burst() moves frames from a TAP-like fd (one read = one frame, virtio_net_hdr
 * first) into the guest's mergeable RX buffers. It is a line-by-line mirror of the Python
 * path for that case (net/device.py: _rx_round with _rx_unknown_mrg and _stash_more), so both
 * produce the same used ring and counters:
 *
 *   - popped RX chains wait in a stash (vw_rxstash, kept by the caller between calls and
 *     handed to/from the Python stash when either side takes over);
 *   - the stash is refilled in batches of up to 64 chains (one avail.idx read each) whenever it
 *     holds fewer bytes than a typical frame (``window``); each chain of a batch is checked
 *     first, as ChainBuilder would: head < size, next < size, at most ``size`` descriptors,
 *     every buffer inside guest RAM, total < 2^32. Anything unusual -- an INDIRECT or readable
 *     descriptor, a chain too small for the header, a bad value, an avail.idx more than
 *     ``size`` ahead, no room left in the stash -- stops the burst (stop 1) BEFORE that batch is
 *     popped: the Python path then pops it and decides (NEEDS_RESET, or a counted drop);
 *   - each frame is read (readv) into the stash chains covering ``window`` plus a private
 *     overflow area (``bounce``); a longer frame's tail is copied into further chains, or --
 *     when the guest has too few (or the refill meets something unusual) -- the burst stops
 *     with the frame read (stop 4) and Python finishes it (held aside until buffers come);
 *   - used elements {head, len} are written from next_used + staged and counted in
 *     res->staged; the caller's ring object publishes used->idx once, after the burst.
 *
 * Memory order: avail->idx is loaded with acquire before the ring entries of a batch are read.
 */
#define RX_MAXC 1024u /* stash chains (power of two) */
#define RX_MAXS 4096u /* stash segments (power of two) */
#define RX_BATCH 64u
#define RX_MAX_IOV 1024

typedef struct {
    uint32_t c_start, c_count; /* chain ring */
    uint32_t s_start, s_count; /* segment ring */
    uint64_t cap;              /* writable bytes of all stashed chains */
    uint16_t head[RX_MAXC];
    uint32_t seg0[RX_MAXC];
    uint32_t nseg[RX_MAXC];
    uint32_t ccap[RX_MAXC];
    uint16_t ndesc[RX_MAXC]; /* ring slots of the chain (packed rings; 1 on split rings) */
    uint64_t gpa[RX_MAXS];
    uint32_t len[RX_MAXS];
} vw_rxstash;

/* The guest's receive filter (§5.1.6.5.1-3), as net/device.py's _rx_accept() applies it. */
#define RX_MAC_MAX 64
typedef struct {
    uint8_t active;     /* 0: accept everything (no CTRL_VLAN, and promiscuous or no CTRL_RX) */
    uint8_t vlan;       /* CTRL_VLAN negotiated: a tagged frame's VID must be in ``vlans`` */
    uint8_t mac_check;  /* CTRL_RX negotiated and not promiscuous */
    uint8_t nobcast, nomulti, multi_all, nouni, uni_all;
    uint8_t mac[6];
    uint16_t n_uc, n_mc;
    uint8_t uc[RX_MAC_MAX][6];
    uint8_t mc[RX_MAC_MAX][6];
    uint8_t vlans[512]; /* bitmap of VIDs */
} vw_rxfilter;

static int in_table(const uint8_t (*t)[6], uint16_t n, const uint8_t *m) {
    for (uint16_t i = 0; i < n && i < RX_MAC_MAX; i++)
        if (!memcmp(t[i], m, 6))
            return 1;
    return 0;
}

/* ``h``: up to 18 bytes of the frame (``n`` of them there). */
static int rx_accept(const vw_rxfilter *f, const uint8_t *h, uint32_t n) {
    static const uint8_t bcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
    if (n < 14)
        return 0;
    if (f->vlan && h[12] == 0x81 && h[13] == 0x00 && n >= 16) {
        uint16_t vid = (uint16_t)(((h[14] << 8) | h[15]) & 0x0fff);
        if (!(f->vlans[vid >> 3] >> (vid & 7) & 1))
            return 0;
    }
    if (!f->mac_check)
        return 1;
    if (!memcmp(h, bcast, 6))
        return !f->nobcast;
    if (h[0] & 1) {
        if (f->nomulti)
            return 0;
        return f->multi_all || in_table(f->mc, f->n_mc, h);
    }
    if (f->nouni)
        return 0;
    return f->uni_all || !memcmp(h, f->mac, 6) || in_table(f->uc, f->n_uc, h);
}

/* Up to ``n`` bytes from offset ``off`` of the stash chains' buffers (gather()). */
static uint32_t rx_gather(const vw_region *regs, int nregs, const vw_rxstash *st, uint8_t *out,
                          uint32_t n, uint64_t off) {
    uint32_t got = 0;
    for (uint32_t c = 0; got < n && c < st->c_count; c++) {
        uint32_t ci = (st->c_start + c) & (RX_MAXC - 1);
        for (uint32_t k = 0; got < n && k < st->nseg[ci]; k++) {
            uint32_t s = (st->seg0[ci] + k) & (RX_MAXS - 1);
            uint32_t len = st->len[s];
            if (off >= len) {
                off -= len;
                continue;
            }
            const uint8_t *p = translate(regs, nregs, st->gpa[s], len);
            if (!p)
                return got;
            uint32_t m = (uint32_t)(len - off) < n - got ? (uint32_t)(len - off) : n - got;
            memcpy(out + got, p + off, m);
            got += m;
            off = 0;
        }
    }
    return got;
}

typedef struct {
    uint64_t frames, bytes, chains;  /* delivered frames, payload bytes, used chains */
    uint64_t popped, staged;         /* chains popped into the stash, used elements written */
    uint64_t reads, read_bytes, errors;
    uint64_t gso, overflow, truncated, runt, filtered;
    int64_t pending;                 /* stop 4: bytes read of the frame left to Python */
    int32_t stop;   /* 0 backend empty, 1 unusual chain, 2 no buffers, 3 limit, 4 frame left */
    int32_t err;    /* errno of the last failed read */
} vw_rxres;

/* One descriptor of an RX chain, split or packed, checked as ChainBuilder checks it: direct,
 * device-writable, inside guest RAM, the chain's running length ``*total`` under 4 GiB. A
 * non-empty one goes to the stash's free segment slot ``spos + *segs`` (relative to the segment
 * ring's end; not yet counted) and ``*segs`` grows. -1: Python must see the chain (or the stash
 * has no room). */
static int rx_take_seg(const vw_region *regs, int nregs, vw_rxstash *st, uint64_t addr,
                       uint32_t len, uint16_t flags, uint32_t spos, uint64_t *total,
                       uint32_t *segs) {
    if ((flags & VIRTQ_DESC_F_INDIRECT) || !(flags & VIRTQ_DESC_F_WRITE))
        return -1;
    if (len && !translate(regs, nregs, addr, len))
        return -1;
    *total += len;
    if (*total > 0xFFFFFFFFull)
        return -1;
    if (len) {
        if (st->s_count + spos + *segs >= RX_MAXS)
            return -1;
        uint32_t k = (st->s_start + st->s_count + spos + *segs) & (RX_MAXS - 1);
        st->gpa[k] = addr;
        st->len[k] = len;
        (*segs)++;
    }
    return 0;
}

/* Check chain ``head`` of a split ring as ChainBuilder would, for the simple RX shape only
 * (direct, all writable), reading each descriptor ONCE (the guest may rewrite them meanwhile):
 * its non-empty segments are written to the stash's free segment slots from ``*spos``
 * (relative to the segment ring's end), not yet counted. Returns 0 with the chain's writable
 * length and segment count in ``cap``/``nseg`` (and ``*spos`` advanced), or -1 when Python must
 * see the chain (or the stash has no room). */
static int rx_check(const vw_split *q, const vw_region *regs, int nregs, vw_rxstash *st,
                    uint16_t head, int hdr_len, uint32_t *spos, uint64_t *cap, uint32_t *nseg) {
    uint32_t i = head, count = 0, segs = 0;
    uint64_t total = 0;
    for (;;) {
        uint64_t addr;
        uint32_t len;
        uint16_t flags, next;
        const uint8_t *d = q->desc + 16 * i;
        memcpy(&addr, d, 8);
        memcpy(&len, d + 8, 4);
        memcpy(&flags, d + 12, 2);
        memcpy(&next, d + 14, 2);
        if (++count > q->size)
            return -1;
        if (rx_take_seg(regs, nregs, st, addr, len, flags, *spos, &total, &segs))
            return -1;
        if (!(flags & VIRTQ_DESC_F_NEXT))
            break;
        if (next >= q->size)
            return -1;
        i = next;
    }
    if (total < (uint64_t)hdr_len || segs == 0)
        return -1;
    *spos += segs;
    *cap = total;
    *nseg = segs;
    return 0;
}

/* Refill the stash until it holds ``need`` bytes: 1 done, 0 the ring ran dry, -1 unusual (the
 * batch met is left unpopped for Python). Mirrors _stash_more + SplitQueue.pop_batch. */
static int rx_stash_more(vw_split *q, const vw_region *regs, int nregs, vw_rxstash *st,
                         int hdr_len, uint64_t need, vw_rxres *res) {
    uint32_t mask = q->size - 1;
    while (st->cap < need) {
        uint16_t avail_idx = __atomic_load_n((uint16_t *)(q->avail + 2), __ATOMIC_ACQUIRE);
        uint16_t pending = (uint16_t)(avail_idx - q->next_avail);
        if (pending > q->size)
            return -1;
        uint32_t n = pending < RX_BATCH ? pending : RX_BATCH;
        if (n == 0)
            return 0;
        if (st->c_count + n > RX_MAXC)
            return -1;
        uint64_t caps[RX_BATCH];
        uint32_t nsegs[RX_BATCH], spos = 0;
        uint16_t heads[RX_BATCH];
        for (uint32_t k = 0; k < n; k++) {
            memcpy(&heads[k], q->avail + 4 + 2 * ((uint16_t)(q->next_avail + k) & mask), 2);
            if (heads[k] >= q->size ||
                rx_check(q, regs, nregs, st, heads[k], hdr_len, &spos, &caps[k], &nsegs[k]))
                return -1;
        }
        /* The whole batch is plain: pop it (its segments are already in place). */
        for (uint32_t k = 0; k < n; k++) {
            uint32_t c = (st->c_start + st->c_count) & (RX_MAXC - 1);
            st->head[c] = heads[k];
            st->seg0[c] = (st->s_start + st->s_count) & (RX_MAXS - 1);
            st->nseg[c] = nsegs[k];
            st->ccap[c] = (uint32_t)caps[k];
            st->ndesc[c] = 1;
            st->c_count++;
            st->s_count += nsegs[k];
            st->cap += caps[k];
        }
        q->next_avail = (uint16_t)(q->next_avail + n);
        res->popped += n;
    }
    return 1;
}

/* Copy ``n`` bytes from ``src`` into the stash chains from chain ``c`` (relative) on. */
static void rx_copy_into(const vw_region *regs, int nregs, vw_rxstash *st, uint32_t c,
                         const uint8_t *src, uint64_t n) {
    for (; n && c < st->c_count; c++) {
        uint32_t ci = (st->c_start + c) & (RX_MAXC - 1);
        for (uint32_t k = 0; n && k < st->nseg[ci]; k++) {
            uint32_t s = (st->seg0[ci] + k) & (RX_MAXS - 1);
            uint32_t m = st->len[s] < n ? st->len[s] : (uint32_t)n;
            uint8_t *p = translate(regs, nregs, st->gpa[s], st->len[s]);
            if (!p)
                return; /* not reached: every stashed segment was checked */
            memcpy(p, src, m);
            src += m;
            n -= m;
        }
    }
}

/* The ring format under the RX loop: refill the stash, write one used element. */
typedef struct rx_ring {
    int (*more)(struct rx_ring *r, const vw_region *regs, int nregs, vw_rxstash *st, int hdr_len,
                uint64_t need, vw_rxres *res);
    void (*push)(struct rx_ring *r, uint16_t id, uint16_t ndesc, uint32_t written,
                 vw_rxres *res);
    vw_split *split;
    struct vw_packed_rx *packed;
    uint16_t staged; /* split: used elements staged by the caller before this call */
} rx_ring;

static int split_more(rx_ring *r, const vw_region *regs, int nregs, vw_rxstash *st,
                      int hdr_len, uint64_t need, vw_rxres *res) {
    return rx_stash_more(r->split, regs, nregs, st, hdr_len, need, res);
}

static void split_push(rx_ring *r, uint16_t id, uint16_t ndesc, uint32_t w, vw_rxres *res) {
    vw_split *q = r->split;
    uint8_t *u = q->used + 4 + 8 * ((uint16_t)(q->next_used + r->staged + res->staged) &
                                    (q->size - 1));
    uint32_t id32 = id;
    (void)ndesc;
    memcpy(u, &id32, 4);
    memcpy(u + 4, &w, 4);
    res->staged++;
}

static int rx_burst(rx_ring *rg, const vw_region *regs, int nregs, vw_rxstash *st, int fd,
                    int hdr_len, uint32_t window, uint8_t *bounce, uint32_t bounce_len,
                    int clear_flags, int limit, const vw_rxfilter *filt, vw_rxres *res);

int vw_split_rx_burst(vw_split *q, const vw_region *regs, int nregs, vw_rxstash *st, int fd,
                      int hdr_len, uint32_t window, uint8_t *bounce, uint32_t bounce_len,
                      int clear_flags, int limit, uint16_t staged, const vw_rxfilter *filt,
                      vw_rxres *res) {
    rx_ring r = {split_more, split_push, q, 0, staged};
    return rx_burst(&r, regs, nregs, st, fd, hdr_len, window, bounce, bounce_len, clear_flags,
                    limit, filt, res);
}

static int rx_burst(rx_ring *rg, const vw_region *regs, int nregs, vw_rxstash *st, int fd,
                    int hdr_len, uint32_t window, uint8_t *bounce, uint32_t bounce_len,
                    int clear_flags, int limit, const vw_rxfilter *filt, vw_rxres *res) {
    struct iovec iov[RX_MAX_IOV + 1];
    memset(res, 0, sizeof(*res));
    while ((int)res->frames < limit) {
        if (st->cap < window) {
            if (rg->more(rg, regs, nregs, st, hdr_len, window, res) < 0) {
                res->stop = 1;
                return 0;
            }
        }
        if (st->cap < (uint64_t)hdr_len + 14) {
            res->stop = 2;
            return 0;
        }
        /* The chains covering the window (all of them when fewer), then the overflow area. */
        int niov = 0;
        uint64_t acc = 0;
        uint32_t k = 0;
        while (k < st->c_count) {
            uint32_t ci = (st->c_start + k) & (RX_MAXC - 1);
            if (niov + st->nseg[ci] > RX_MAX_IOV) {
                res->stop = 1;
                return 0;
            }
            for (uint32_t j = 0; j < st->nseg[ci]; j++) {
                uint32_t s = (st->seg0[ci] + j) & (RX_MAXS - 1);
                iov[niov].iov_base = translate(regs, nregs, st->gpa[s], st->len[s]);
                iov[niov].iov_len = st->len[s];
                if (!iov[niov].iov_base) { /* guest RAM changed under a stashed chain */
                    res->stop = 1;
                    return 0;
                }
                niov++;
            }
            acc += st->ccap[ci];
            k++;
            if (acc >= window)
                break;
        }
        iov[niov].iov_base = bounce;
        iov[niov].iov_len = bounce_len;
        ssize_t r = readv(fd, iov, niov + 1);
        if (r < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK) {
                res->errors++;
                res->err = errno;
            }
            res->stop = 0;
            return 0;
        }
        res->reads++;
        res->read_bytes += (uint64_t)r;
        if (r == 0) {
            res->stop = 0;
            return 0;
        }
        uint64_t total = (uint64_t)r;
        if (total > acc) {
            uint64_t over = total - acc;
            if (over > bounce_len) {
                res->truncated++;
                continue;
            }
            if (st->cap < total && rg->more(rg, regs, nregs, st, hdr_len, total, res) != 1) {
                /* Python finishes this frame (held aside, or unusual chains) and counts it */
                res->stop = 4;
                res->pending = r;
                return 0;
            }
            res->overflow++;
            rx_copy_into(regs, nregs, st, k, bounce, over);
        }
        if (total < (uint64_t)hdr_len) {
            res->runt++;
            continue;
        }
        if (filt->active) {
            uint8_t h[18];
            /* the chains read into (views) begin the stash; gather() reads buffers, not frame */
            uint32_t got = rx_gather(regs, nregs, st, h, 18, (uint64_t)hdr_len);
            if (!rx_accept(filt, h, got)) {
                res->filtered++;
                continue;
            }
        }
        /* v0: the first chain's first non-empty segment (the Python path's first view); a
         * header spread over several segments is written byte-wise below. */
        uint32_t c0 = st->c_start & (RX_MAXC - 1), s0 = st->seg0[c0];
        uint8_t *v0 = translate(regs, nregs, st->gpa[s0], st->len[s0]);
        uint32_t v0len = st->len[s0];
        if (v0len >= 2 && v0[1])
            res->gso++;
        if (clear_flags)
            v0[0] = 0;
        /* Hand the chains over (§5.1.6.4): as many as the frame fills, at least one. */
        uint64_t left = total;
        uint16_t used = 0;
        while (st->c_count && (left > 0 || used == 0)) {
            uint32_t ci = st->c_start & (RX_MAXC - 1);
            uint32_t w = st->ccap[ci] < left ? st->ccap[ci] : (uint32_t)left;
            rg->push(rg, st->head[ci], st->ndesc[ci], w, res);
            st->cap -= st->ccap[ci];
            st->s_start = (st->s_start + st->nseg[ci]) & (RX_MAXS - 1);
            st->s_count -= st->nseg[ci];
            st->c_start = (st->c_start + 1) & (RX_MAXC - 1);
            st->c_count--;
            left -= w;
            used++;
        }
        if (hdr_len == 12) { /* num_buffers (le16 at offset 10), inside the first chain */
            uint8_t nb[2] = {(uint8_t)(used & 0xff), (uint8_t)(used >> 8)};
            if (v0len >= 12) {
                v0[10] = nb[0];
                v0[11] = nb[1];
            } else {
                uint32_t off = 10, done = 0;
                for (uint32_t j = 0; j < st->nseg[c0] && done < 2; j++) {
                    uint32_t s = (s0 + j) & (RX_MAXS - 1);
                    uint8_t *p = translate(regs, nregs, st->gpa[s], st->len[s]);
                    if (!p)
                        break;
                    for (uint32_t b = 0; b < st->len[s] && done < 2; b++) {
                        if (off) {
                            off--;
                            continue;
                        }
                        p[b] = nb[done++];
                    }
                }
            }
        }
        res->frames++;
        res->chains += used;
        res->bytes += total - hdr_len;
    }
    res->stop = 3;
    return 0;
}

/* ---- packed-ring RX (virtio 1.2 §2.8): the same loop, packed ring operations ------------------
 * Refill mirrors PackedQueue.pop_batch (up to 64 chains while the slot at next_avail is
 * available for our wrap counter; a chain is a NEXT-linked list in consecutive slots, its buffer
 * id in the last one, §2.8.6), used elements mirror PackedQueue.push: len and id written at
 * next_used, flags (AVAIL = USED = used wrap counter, WRITE when written) stored at once except
 * for the first element of the batch, whose flags the caller's ring object stores last in
 * publish() (that store exposes the whole batch to the driver, §2.8.21). */
typedef struct vw_packed_rx {
    uint8_t *desc;
    uint32_t size;
    uint16_t next_avail, avail_wrap, next_used, used_wrap;
    uint32_t inflight;
    int32_t have_first;  /* in: the caller already holds a first element back; out: we do */
    uint16_t first_slot, first_flags;
} vw_packed_rx;

static int pk_rx_more(rx_ring *r, const vw_region *regs, int nregs, vw_rxstash *st,
                      int hdr_len, uint64_t need, vw_rxres *res) {
    vw_packed_rx *q = r->packed;
    while (st->cap < need) {
        uint32_t slot = q->next_avail, inflight = q->inflight, spos = 0, n_chains = 0;
        int wrap = q->avail_wrap;
        uint16_t ids[RX_BATCH], nds[RX_BATCH];
        uint32_t nsegs[RX_BATCH];
        uint64_t caps[RX_BATCH];
        if (slot >= q->size)
            return -1;
        while (n_chains < RX_BATCH) {
            const uint8_t *d = q->desc + 16 * slot;
            uint16_t flags = __atomic_load_n((uint16_t *)(d + 14), __ATOMIC_ACQUIRE);
            if (!pk_avail(flags, wrap))
                break;
            uint32_t s = slot, n = 0, segs = 0;
            int w = wrap;
            uint64_t total = 0;
            for (;;) {
                uint64_t addr;
                uint32_t len;
                memcpy(&addr, d, 8);
                memcpy(&len, d + 8, 4);
                if (rx_take_seg(regs, nregs, st, addr, len, flags, spos, &total, &segs))
                    return -1;
                n++;
                if (!(flags & VIRTQ_DESC_F_NEXT))
                    break;
                if (n >= q->size)
                    return -1;
                if (++s == q->size) {
                    s = 0;
                    w ^= 1;
                }
                d = q->desc + 16 * s;
                flags = __atomic_load_n((uint16_t *)(d + 14), __ATOMIC_ACQUIRE);
                if (!pk_avail(flags, w))
                    return -1;
            }
            uint16_t id;
            memcpy(&id, d + 12, 2);
            if (id >= q->size || inflight + n > q->size || total < (uint64_t)hdr_len ||
                segs == 0 || st->c_count + n_chains >= RX_MAXC)
                return -1;
            ids[n_chains] = id;
            nds[n_chains] = (uint16_t)n;
            nsegs[n_chains] = segs;
            caps[n_chains] = total;
            n_chains++;
            spos += segs;
            inflight += n;
            if (++s == q->size) {
                s = 0;
                w ^= 1;
            }
            slot = s;
            wrap = w;
        }
        if (n_chains == 0)
            return 0;
        for (uint32_t k = 0; k < n_chains; k++) {
            uint32_t c = (st->c_start + st->c_count) & (RX_MAXC - 1);
            st->head[c] = ids[k];
            st->seg0[c] = (st->s_start + st->s_count) & (RX_MAXS - 1);
            st->nseg[c] = nsegs[k];
            st->ccap[c] = (uint32_t)caps[k];
            st->ndesc[c] = nds[k];
            st->c_count++;
            st->s_count += nsegs[k];
            st->cap += caps[k];
        }
        q->next_avail = (uint16_t)slot;
        q->avail_wrap = (uint16_t)wrap;
        q->inflight = inflight;
        res->popped += n_chains;
    }
    return 1;
}

static void pk_rx_push(rx_ring *r, uint16_t id, uint16_t ndesc, uint32_t w, vw_rxres *res) {
    vw_packed_rx *q = r->packed;
    uint8_t *d = q->desc + 16 * q->next_used;
    uint16_t flags = (uint16_t)((q->used_wrap ? (PK_F_AVAIL | PK_F_USED) : 0) |
                                (w ? VIRTQ_DESC_F_WRITE : 0));
    memcpy(d + 8, &w, 4);
    memcpy(d + 12, &id, 2);
    if (!q->have_first) {
        q->have_first = 1;
        q->first_slot = q->next_used;
        q->first_flags = flags;
    } else {
        __atomic_store_n((uint16_t *)(d + 14), flags, __ATOMIC_RELEASE);
    }
    uint32_t slot = (uint32_t)q->next_used + ndesc;
    if (slot >= q->size) {
        slot -= q->size;
        q->used_wrap ^= 1;
    }
    q->next_used = (uint16_t)slot;
    q->inflight -= ndesc;
    res->staged++;
}

int vw_packed_rx_burst(vw_packed_rx *q, const vw_region *regs, int nregs, vw_rxstash *st,
                       int fd, int hdr_len, uint32_t window, uint8_t *bounce,
                       uint32_t bounce_len, int clear_flags, int limit,
                       const vw_rxfilter *filt, vw_rxres *res) {
    rx_ring r = {pk_rx_more, pk_rx_push, 0, q, 0};
    if (q->next_used >= q->size || q->next_avail >= q->size) {
        memset(res, 0, sizeof(*res));
        res->stop = 1;
        return 0;
    }
    return rx_burst(&r, regs, nregs, st, fd, hdr_len, window, bounce, bounce_len, clear_flags,
                    limit, filt, res);
}

/*
 * SIGBUS guard for guest memory the front end can shrink (issue 14, defect 1).
 *
 * A memfd that was not sealed against shrinking (DPDK's --no-huge memory is created without
 * MFD_ALLOW_SEALING) can be truncated by the peer under a live mapping; the next access to a
 * page beyond the new end raises SIGBUS, which would kill every port of the process. Ranges
 * registered here are guarded: on a SIGBUS (BUS_ADRERR) inside one, the handler maps an
 * anonymous page of the range's alignment over the faulting page (MAP_FIXED, async-signal-safe)
 * and counts the fault; the access is retried and sees zeros. The owner polls the count and
 * drops the peer. A fault outside every range restores the default action and re-faults
 * (the process dies as it would have without the guard).
 */
#include <signal.h>
#include <sys/mman.h>

#define VW_GUARD_MAX 128
static struct { uintptr_t start, end, align; volatile uint64_t faults; } vw_guard[VW_GUARD_MAX];
static int vw_guard_installed;

static void vw_on_sigbus(int sig, siginfo_t *si, void *uc)
{
    (void)uc;
    uintptr_t a = (uintptr_t)si->si_addr;
    for (int i = 0; i < VW_GUARD_MAX; i++) {
        if (vw_guard[i].end && a >= vw_guard[i].start && a < vw_guard[i].end) {
            uintptr_t page = a & ~(vw_guard[i].align - 1);
            void *p = mmap((void *)page, vw_guard[i].align, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
            if (p != MAP_FAILED) {
                vw_guard[i].faults++;
                return;
            }
            break;
        }
    }
    signal(sig, SIG_DFL);  /* not ours, or cannot patch: die as without the guard */
}

int vw_guard_add(uint64_t start, uint64_t len, uint64_t align)
{
    if (!vw_guard_installed) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = vw_on_sigbus;
        sa.sa_flags = SA_SIGINFO | SA_NODEFER;
        sigemptyset(&sa.sa_mask);
        if (sigaction(SIGBUS, &sa, NULL) != 0)
            return -1;
        vw_guard_installed = 1;
    }
    if (align == 0 || (align & (align - 1)) || (start & (align - 1)))
        return -1;
    for (int i = 0; i < VW_GUARD_MAX; i++) {
        if (!vw_guard[i].end) {
            vw_guard[i].start = start;
            vw_guard[i].align = align;
            vw_guard[i].faults = 0;
            __atomic_store_n(&vw_guard[i].end, start + len, __ATOMIC_RELEASE);
            return i;
        }
    }
    return -1;
}

uint64_t vw_guard_faults(int slot)
{
    return (slot >= 0 && slot < VW_GUARD_MAX) ? vw_guard[slot].faults : 0;
}

void vw_guard_remove(int slot)
{
    if (slot >= 0 && slot < VW_GUARD_MAX)
        __atomic_store_n(&vw_guard[slot].end, 0, __ATOMIC_RELEASE);
}
