"""The study's face: one self-contained HTML report (plots embedded, per-token viewer) + Markdown."""
