"""virtwire.conform: a conformance suite for virtio-net devices, run by our driver."""
