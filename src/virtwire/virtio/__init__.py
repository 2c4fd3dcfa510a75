"""The virtio core: rings, descriptor chains, feature and status state machines (sans-I/O)."""
