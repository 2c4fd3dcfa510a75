"""The 93C46 serial EEPROM behind 9346CR: 64 words of 16 bits, read by bit-banging.

In programming mode (9346CR bits 7:6 = 10) the low four bits of 9346CR are the EEPROM's pins:
EECS (3), EESK (2), EEDI (1) driven by the host, EEDO (0) driven by the EEPROM. With CS high,
each rising edge of SK shifts one bit in: leading zeros are ignored until the start bit (1), then
a 2-bit opcode and a 6-bit address. A READ (opcode 10) then puts a dummy 0 on DO and shifts out
the addressed word MSB first, one bit per rising edge, continuing into the next word (a
sequential read). CS low ends the command. Linux's 8139too probes with an 8-bit address first
(``read_eeprom(ioaddr, 0, 8) == 0x8129``); on a 93C46 that read comes back shifted and the driver
falls back to 6-bit addresses, then reads the MAC from words 7-9. Writes and erases are accepted
and ignored (the contents are this device's, not the guest's).
"""

from __future__ import annotations

__all__ = ["Eeprom93C46"]

_WORDS = 64
_READ = 0b10


class Eeprom93C46:
    """Bit-level model of the 93C46 (see module docstring)."""

    def __init__(self, mac: bytes, vendor: int = 0x10EC, device: int = 0x8139) -> None:
        self.words = [0] * _WORDS
        self.words[0] = 0x8129  # the RTL8139 EEPROM signature
        self.words[1] = vendor
        self.words[2] = device
        self.words[3] = vendor  # subsystem vendor
        self.words[4] = device  # subsystem id
        for i in range(3):
            self.words[7 + i] = mac[2 * i] | mac[2 * i + 1] << 8
        self.reads = 0
        self.reset()

    def reset(self) -> None:
        self.cs = False
        self.sk = False
        self.do = 0
        self._bits = 0  # command bits shifted in after the start bit
        self._nbits = -1  # -1: waiting for the start bit
        self._out: int | None = None  # address being read out
        self._outbit = 0

    def pins(self, cs: bool, sk: bool, di: bool) -> None:
        """The host drove CS, SK and DI (one 9346CR write in programming mode)."""
        if not cs:
            self.reset()
            return
        self.cs = True
        rising = sk and not self.sk
        self.sk = sk
        if rising:
            self._clock(di)

    def _clock(self, di: bool) -> None:
        if self._out is not None:
            self.do = (self.words[self._out] >> (15 - self._outbit)) & 1
            self._outbit += 1
            if self._outbit == 16:
                self._outbit = 0
                self._out = (self._out + 1) % _WORDS
            return
        if self._nbits < 0:
            if di:
                self._nbits = 0
            return
        self._bits = self._bits << 1 | int(di)
        self._nbits += 1
        if self._nbits == 8:
            op, addr = self._bits >> 6, self._bits & 0x3F
            if op == _READ:
                self.reads += 1
                self._out = addr
                self._outbit = 0
                self.do = 0  # the dummy bit
            else:
                self._nbits = -1  # EWEN/WRITE/ERASE: ignored
                self._bits = 0
