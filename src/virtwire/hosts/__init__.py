"""Hosts: where our device lives -- what puts a virtio device in front of a guest and runs it on an
event loop.

- vhost-user (QEMU, DPDK virtio-user): ``vhost_user.VhostUserBackend`` (the connection and its
  messages; wire format in ``vhost_user_proto``), ``vhost_rings.VringTable`` (guest memory and
  ring state), ``vhost_device.VirtioDeviceHost`` (a ``VirtioDevice`` behind it).
- the whole PCI function behind QEMU's multi-process PCI proxy: ``pci_proxy.PciProxyServer``, an
  adapter of ``pci.function.PciFunction`` (``qtest_irq`` raises its INTx through qtest under TCG).
- ``pump.BackendPump``: every host's frame-backend side -- watch the backend fds, pause while the
  guest has no RX buffers, resume on an RX kick.
"""
