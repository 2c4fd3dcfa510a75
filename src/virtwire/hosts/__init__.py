"""virtwire.hosts."""
