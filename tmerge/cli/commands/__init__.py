"""One module per CLI command; each imports ``app`` from ``tmerge.cli`` and registers on it."""
