"""virtwire.conform: a conformance suite for virtio-net devices, run by our driver.

``context`` holds results, the check registry and the ``Context`` a check runs in;
``checks_core`` and ``checks_offload`` are the checks; ``suite`` runs them; ``targets`` opens
a device (QEMU, virtwire serve, DPDK) and ``peers`` the other end of its wire."""
