"""virtwire.net."""
