"""Reports: the dict built from a probe, its schema and files, the console, HTML and comparisons."""
