"""Test tooling shared by tests and bench/ (never imported by the runtime package)."""
