"""Metrics: RA1–RA4 (`ra`), NC1–NC4 (`nc`) and the verdicts (`verdict`)."""
