"""libvirt integration: check domain XML for a vhost-user NIC on virtwire, write the parts."""
