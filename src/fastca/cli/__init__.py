"""The `fastca` command line."""
