"""Routing analysis: capture (I/O), metrics and statistics (pure computation)."""
