"""Experts trained apart, then merged (Branch-Train-MiX) or ensembled (c-BTM)."""
