"""virtwire: both halves of a virtio-net link, in Python.

The device half is a virtio-net device a real Linux guest drives (served to QEMU through vhost-user
or its multi-process PCI proxy); the driver half drives any virtio-net device (QEMU's own over
qtest, or a vhost-user backend). See README.md.
"""

__version__ = "0.1.0"
