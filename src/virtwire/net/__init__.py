"""virtio-net: the device model, its data path, and the driver model (virtio 1.2 §5.1).

Device (what a guest drives): ``device.VirtioNet`` is the model -- features, config space,
queue roles, activation, the hooks hosts call; it combines ``tx.Transmit``,
``rx.Receive`` (one fill step per buffer strategy, one deliver step, an ``RxStep`` result) and
``ctrl.ControlQueue`` with the ``ctrl.RxFilter``. Per-pair state is ``pair.QueuePair``,
counters ``counters.TxCounters``/``RxCounters``, the C fast path's binding ``native``.
``backend.NetBackend`` is what a queue pair's far end must offer (implementations:
``virtwire.backends``); ``options`` the QEMU-style device options.

Driver (the guest's half, for tests and conformance): ``driver.VirtioNetDriver`` with
``driver_rx`` (receive) and ``transport`` (the transport interface, feature selection).
Shared: ``header`` (``virtio_net_hdr``, checksums), ``frame`` (Ethernet/IP frames).
"""
