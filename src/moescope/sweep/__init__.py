"""Sweeps: one study config, a grid of overrides and several seeds, run cell by cell and summarized.

`grid` expands and aggregates (pure computation), `plots` draws the summary (I/O),
`runner` decides what runs where (orchestration: data, shared base stages, cells,
process pool or submitit).
"""
