/*
 * virtwire native batch helper: the split-ring TX fast path of the virtio-net device.
 *
 * Theory of operation
 * -------------------
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
        if (!indirect_ok || (flags & (VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE)) || len == 0 ||
            len % 16)
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
#define PK_MAX_INDIRECT 32768u

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
        memcpy(&flags, d + 14, 2);
        if (slot >= q->size || !pk_avail(flags, w))
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
