"""virtio over PCI, both halves.

Device side: ``device.VirtioPciDevice`` owns the configuration space (``config_space``) and the
register blocks in its BARs (one ``Reg`` table per block; ``reg_names`` names config-space
fields for traces) and maps every access onto a ``virtio.device.VirtioDevice``; ``function``
is the interface a host that plays the whole PCI device drives (config and BAR access, an
interrupt line). Driver side: ``bus`` enumerates, sizes BARs, walks capabilities and routes
INTx; ``driver`` holds the modern and legacy transports over a function found there.
"""
