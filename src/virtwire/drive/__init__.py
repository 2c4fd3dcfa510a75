"""virtwire.drive."""
