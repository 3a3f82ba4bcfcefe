"""MoE sentence-embedding encoders on sentence-transformers."""
