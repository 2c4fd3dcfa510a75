"""Guests on QEMU: the image builder (``image``), the launcher (``qemu.GuestVM``), the serial
console, and the NIC kinds of ``--net KIND,...`` (``nics`` is the registry; each
``nic_<kind>`` module registers its kind)."""
