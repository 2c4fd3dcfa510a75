"""virtwire.commands."""
