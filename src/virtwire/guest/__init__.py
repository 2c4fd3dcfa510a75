"""virtwire.guest."""
