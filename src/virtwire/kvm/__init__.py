"""``virtwire kvm``: a small VMM on /dev/kvm whose exits reach virtwire's PCI bus and device.

``vm.Vm`` (VM, RAM, vCPU, run loop), ``devices`` (PCI host bridge, UART, exit port), ``host``
(our virtio-net function's loop and INTx), ``program`` (the guest C program), ``machine`` (the
whole machine), ``events`` (``kvm`` trace events and register names).
"""

from virtwire.kvm.vm import KvmError, StopReason, Vm

__all__ = ["KvmError", "StopReason", "Vm"]
