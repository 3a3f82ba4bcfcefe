"""Data stage: sources -> split -> tokenize -> pack -> block store + manifest."""
