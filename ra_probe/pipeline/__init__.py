"""The pipeline stage: one probe run from the loaded model to plain results, calling the stages below.

options.py    every probe option once (name, default, valid values, help, command-line flag)
settings.py   `Settings`, the options of one probe, validated from that table
prepare.py    the model made ready in place for the probe's duration (device, dtype, eval), restored after
measure.py    each group of sites measured chunk by chunk: capture, the engine's SVDs, RA2 products
summarize.py  per-site spectra, RA1–RA4 and NC from what was measured
cache.py      measured groups kept on disk, keyed by everything they depend on
run.py        one probe from start to end (and its null model), as an `Outcome`"""
