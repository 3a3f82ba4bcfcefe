"""Shared I/O helpers: atomic writes, config files, provenance."""
