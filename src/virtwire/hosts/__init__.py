"""Hosts: what puts a virtio device in front of a guest and runs it on an event loop.

- vhost-user (QEMU, DPDK virtio-user): ``vhost_user.VhostUserBackend`` (the connection and its
  messages; wire format in ``vhost_user_proto``), ``vhost_rings.VringTable`` (guest memory and
  ring state), ``vhost_device.VirtioDeviceHost`` (a ``VirtioDevice`` behind it).
- the whole PCI function over QEMU's vfio-user-like proxy: ``pci_proxy.PciProxyServer``
  (``qtest_irq`` raises its interrupt line under TCG).
- ``pump.BackendPump``: every host's frame-backend side -- watch the backend fds, pause while the
  guest has no RX buffers, resume on an RX kick.
"""
