"""The command line: serve, convert, merge, demo-model."""
