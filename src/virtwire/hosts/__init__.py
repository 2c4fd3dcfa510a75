"""Where our device lives: a host carries a guest's accesses to a virtwire device model.
``vhost_user`` (+ ``vhost_user_proto``) serves it to QEMU over vhost-user; ``pci_proxy`` plays the
whole PCI device behind QEMU's PCI proxy (through ``pci.function``); ``qtest_irq`` raises its
INTx through qtest."""
