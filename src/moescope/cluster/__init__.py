"""Clustering experts by co-activation (experts that fire on the same tokens group together):
merge (computation), io, orchestration."""
