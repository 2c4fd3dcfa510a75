"""virtwire.pci."""
