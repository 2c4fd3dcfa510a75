"""virtwire.testing."""
