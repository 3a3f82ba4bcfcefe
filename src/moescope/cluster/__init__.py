"""Clustering experts by co-activation (seed 004): merge (computation), io, orchestration."""
