"""Corpus partitioning for expert specialization (random / clustered / curriculum)."""
