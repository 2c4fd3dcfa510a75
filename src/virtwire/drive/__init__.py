"""How our driver reaches a device: ``qtest`` (a QEMU guest's memory, port I/O and IRQs over
QEMU's qtest protocol) and ``vhost_user_frontend`` (our own vhost-user front end)."""
