"""Built-in architecture adapters, one module per family, each registered through the
`ra_probe.adapters` entry-point group exactly as a third-party adapter would be."""
