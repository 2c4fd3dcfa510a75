"""virtwire.backends."""
