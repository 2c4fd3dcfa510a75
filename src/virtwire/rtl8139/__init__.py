"""An emulated Realtek RTL8139 NIC: the full-virtualization counterpart of virtwire's virtio-net.

``device`` is the sans-I/O register model (classic RTL8139, ``8139too``), ``cplus`` its C+ mode
(``8139cp``), ``eeprom`` the 93C46 the driver reads the MAC from, ``regs`` the register map, and
``pci`` the PCI function and backend glue a host (QEMU's PCI proxy) serves.
"""
