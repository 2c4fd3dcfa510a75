/* virtwire kvm guest: the contract with the VMM (src/virtwire/kvm/guest.py mirrors it). */
#ifndef VW_H
#define VW_H
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define VW_PARAMS 0x7000u
#define VW_MAGIC 0x564b5756u /* "VWKV" */
enum { MODE_PING = 1, MODE_BURST = 2, MODE_GARBAGE = 10, MODE_BADBAR = 11, MODE_BADRING = 12,
       MODE_BADINSN = 13, MODE_INT3 = 14, MODE_EXITS = 20 };
struct vw_params {
    u32 magic, mode;
    u8 ip[4];
    u32 prefix, burst_count, burst_size, irq;
    volatile u32 stop;      /* the VMM sets 1: print the report and exit */
    u32 exits_count;        /* MODE_EXITS: port writes to make (benchmark) */
    u32 queue_size;         /* preferred ring size (modern) */
};
#define PORT_EXIT 0x501      /* outl 0x5657SSSS: exit with status SS */
#define PORT_COM1 0x3f8
#define PORT_BENCH 0x502     /* a port that only counts (exit-path benchmark) */
/* Exit statuses the VMM names (kvm/guest.py GUEST_STATUS). */
enum { ST_OK = 0, ST_NO_DEVICE = 0x20, ST_INIT_FAILED = 0x21, ST_NEEDS_RESET = 0x22,
       ST_HOSTILE_DONE = 0x23, ST_BAD_PARAMS = 0x24, ST_EXCEPTION = 0x30 };
#endif
