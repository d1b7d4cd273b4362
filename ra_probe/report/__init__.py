"""The report stage: a probe's results as one plain dict, and everything that shows or stores it.

build.py     the report dict, built once; everything below reads it
schema.py    its JSON Schema (report.schema.json) and validation
files.py     report files written atomically, read back validated
headline.py  a report's headline numbers by one set of names (gate, compare, sweeps, callbacks)
format.py    how a value prints, alike in the console, the HTML and the gate's lines
console.py   rich tables
html.py      the self-contained HTML page (templates/) with its figures (plots.py)
compare.py   several reports side by side, σ₁ across depths of one family"""
