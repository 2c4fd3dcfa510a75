"""The tiny halt firmware the qtest VM runs instead of a BIOS.

Theory of operation
-------------------
With ``-S`` QEMU's devices never process their queues (the main loop's device work is gated on the
VM running), so the qtest VM must *run*; but nothing should touch the hardware except our driver.
An x86 CPU starts at the reset vector, physical 0xFFFFFFF0 (CS base 0xFFFF0000, IP 0xFFF0). QEMU
maps a ``-bios`` image so that its last byte sits at 4 GiB - 1 (and the last 128 KiB are aliased
below 1 MiB). A 64 KiB image whose bytes at offset 0xFFF0 are ``cli; hlt; jmp $-1`` leaves the vCPU
halted with interrupts masked forever: QEMU is idle except for the device emulation we drive.

The image is deterministic, so it is generated on demand (no binary in the tree).
"""

from __future__ import annotations

import os
import tempfile

__all__ = ["FIRMWARE_SIZE", "RESET_VECTOR_OFFSET", "HALT_CODE", "firmware_image", "write_firmware"]

FIRMWARE_SIZE = 64 * 1024
RESET_VECTOR_OFFSET = FIRMWARE_SIZE - 16  # physical 0xFFFFFFF0 / 0xFFFF0
# fa: cli   f4: hlt   eb fd: jmp back to the hlt (an NMI or SMI wakes hlt; go back to sleep)
HALT_CODE = bytes([0xFA, 0xF4, 0xEB, 0xFD])


def firmware_image() -> bytes:
    """The 64 KiB image: 0xFF padding (as an erased flash) and the halt loop at the reset vector."""
    img = bytearray(b"\xff" * FIRMWARE_SIZE)
    img[RESET_VECTOR_OFFSET : RESET_VECTOR_OFFSET + len(HALT_CODE)] = HALT_CODE
    # hlt sits at offset +1, the jmp's target: (+4) + (-3) = +1.
    return bytes(img)


def write_firmware(directory: str | None = None) -> str:
    """Write the image to a file (in ``directory`` or a temp dir) and return its path."""
    fd, path = tempfile.mkstemp(prefix="vw-halt-", suffix=".bin", dir=directory)
    with os.fdopen(fd, "wb") as f:
        f.write(firmware_image())
    return path
