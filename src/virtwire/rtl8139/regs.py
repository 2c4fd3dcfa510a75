"""RTL8139 register map: offsets, widths and names, and the bits the model uses.

Names follow the Realtek RTL8139(A/B/C/D) datasheets; Linux's 8139too/8139cp name the same
offsets differently (``TxStatus0`` is TSD0, ``RxBuf`` is RBSTART, ``RxBufPtr`` is CAPR,
``RxBufAddr`` is CBR, ``IntrMask``/``IntrStatus`` are IMR/ISR, ``Cfg9346`` is 9346CR, ``TxPoll``
is TPPoll, ``CpCmd`` is CPCR). The register file is 256 bytes, mapped identically through the I/O
BAR and the memory BAR.
"""

from __future__ import annotations

__all__ = ["REGISTERS", "REGISTERS_CPLUS", "register_table"]

IDR0 = 0x00
MAR0 = 0x08
TSD0 = 0x10
TSAD0 = 0x20
RBSTART = 0x30
CR = 0x37
CAPR = 0x38
CBR = 0x3A
IMR = 0x3C
ISR = 0x3E
TCR = 0x40
RCR = 0x44
TCTR = 0x48
MPC = 0x4C
CR9346 = 0x50
CONFIG0 = 0x51
CONFIG1 = 0x52
TIMERINT = 0x54
MSR = 0x58
CONFIG3 = 0x59
CONFIG4 = 0x5A
HLTCLK = 0x5B
MULINT = 0x5C
TSAD_SUMMARY = 0x60
BMCR = 0x62
BMSR = 0x64
ANAR = 0x66
ANLPAR = 0x68
ANER = 0x6A
CSCR = 0x74
CONFIG5 = 0xD8
# C+ mode (RTL8139C+): the TX ring addresses reuse TSAD0-3
TNPDS = 0x20
THPDS = 0x28
TPPOLL = 0xD9
RMS = 0xDA
CPCR = 0xE0
INTR_MITIGATE = 0xE2
RDSAR = 0xE4
ETTHR = 0xEC

# CR (command register)
CR_RST = 0x10
CR_RE = 0x08
CR_TE = 0x04
CR_BUFE = 0x01

# ISR / IMR bits
INT_ROK = 0x0001
INT_RER = 0x0002
INT_TOK = 0x0004
INT_TER = 0x0008
INT_RXOVW = 0x0010
INT_PUN = 0x0020
INT_FOVW = 0x0040
INT_TDU = 0x0080  # C+: TX descriptor unavailable
INT_SWINT = 0x0100
INT_LENCHG = 0x2000
INT_TIMEOUT = 0x4000
INT_SERR = 0x8000

# TSD bits
TSD_SIZE = 0x1FFF
TSD_OWN = 0x2000
TSD_TUN = 0x4000
TSD_TOK = 0x8000
TSD_TABT = 0x40000000

# RX packet header status
RX_ROK = 0x0001
RX_BAR = 0x2000
RX_PAM = 0x4000
RX_MAR = 0x8000

# RCR bits
RCR_AAP = 0x01
RCR_APM = 0x02
RCR_AM = 0x04
RCR_AB = 0x08
RCR_WRAP = 0x80  # set: no wrap (the frame runs past the end of the ring)
RCR_RBLEN_SHIFT = 11

# 9346CR
EEM_MASK = 0xC0
EEM_PROGRAM = 0x80
EEM_CONFIG_WRITE = 0xC0
EE_CS = 0x08
EE_SK = 0x04
EE_DI = 0x02
EE_DO = 0x01

# C+ command register bits / TPPoll
CPCR_RXCHKSUM = 0x0020
CPCR_CPRX = 0x0002
CPCR_CPTX = 0x0001
TPPOLL_NPQ = 0x40

_BASE: list[tuple[int, int, str]] = [
    *((IDR0 + i, 1, f"IDR{i}") for i in range(6)),
    (0x06, 2, "IDR_RSVD"),  # 8139too writes IDR4-5 as a dword
    *((MAR0 + i, 1, f"MAR{i}") for i in range(8)),
    *((TSD0 + 4 * i, 4, f"TSD{i}") for i in range(4)),
    *((TSAD0 + 4 * i, 4, f"TSAD{i}") for i in range(4)),
    (RBSTART, 4, "RBSTART"), (0x34, 2, "ERBCR"), (0x36, 1, "ERSR"), (CR, 1, "CR"),
    (CAPR, 2, "CAPR"), (CBR, 2, "CBR"), (IMR, 2, "IMR"), (ISR, 2, "ISR"), (TCR, 4, "TCR"),
    (RCR, 4, "RCR"), (TCTR, 4, "TCTR"), (MPC, 4, "MPC"), (CR9346, 1, "9346CR"),
    (CONFIG0, 1, "CONFIG0"), (CONFIG1, 1, "CONFIG1"), (TIMERINT, 4, "TimerInt"),
    (MSR, 1, "MSR"), (CONFIG3, 1, "CONFIG3"), (CONFIG4, 1, "CONFIG4"), (HLTCLK, 1, "HLTCLK"),
    (MULINT, 2, "MULINT"), (0x5E, 1, "RERID"), (TSAD_SUMMARY, 2, "TSAD"), (BMCR, 2, "BMCR"),
    (BMSR, 2, "BMSR"), (ANAR, 2, "ANAR"), (ANLPAR, 2, "ANLPAR"), (ANER, 2, "ANER"),
    (0x6C, 2, "DIS"), (0x6E, 2, "FCSC"), (0x70, 2, "NWAYTR"), (0x72, 2, "REC"),
    (CSCR, 2, "CSCR"), (0x78, 4, "PHY1_PARM"), (0x7C, 4, "TW_PARM"), (0x80, 1, "PHY2_PARM"),
    (0xD4, 4, "FLASH"), (CONFIG5, 1, "CONFIG5"),
]
REGISTERS: tuple[tuple[int, int, str], ...] = tuple(_BASE)
REGISTERS_CPLUS: tuple[tuple[int, int, str], ...] = tuple(
    [r for r in _BASE if not TSAD0 <= r[0] < TSAD0 + 16 and not TSD0 <= r[0] < TSD0 + 8]
    + [(TSD0, 4, "DTCCR_LO"), (TSD0 + 4, 4, "DTCCR_HI"), (TNPDS, 4, "TNPDS_LO"),
       (TNPDS + 4, 4, "TNPDS_HI"), (THPDS, 4, "THPDS_LO"), (THPDS + 4, 4, "THPDS_HI"),
       (TPPOLL, 1, "TPPoll"), (RMS, 2, "RMS"), (CPCR, 2, "CPCR"),
       (INTR_MITIGATE, 2, "IntrMitigate"), (RDSAR, 4, "RDSAR_LO"), (RDSAR + 4, 4, "RDSAR_HI"),
       (ETTHR, 1, "ETThR")])


def register_table(regs: tuple[tuple[int, int, str], ...]) -> list[tuple[int, int, str] | None]:
    """Per byte offset (0-255): the register ``(start, width, name)`` covering it, or None."""
    table: list[tuple[int, int, str] | None] = [None] * 256
    for start, width, name in regs:
        for o in range(start, start + width):
            table[o] = (start, width, name)
    return table
