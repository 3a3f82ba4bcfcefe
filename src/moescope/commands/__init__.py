"""Orchestration layer: one module per CLI command, each with register(subparsers)."""
