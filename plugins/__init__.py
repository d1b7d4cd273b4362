"""Built-in architecture adapters (spec §5), one module per family, each registered through the
`ra_probe.adapters` entry-point group exactly as a third-party adapter would be."""
