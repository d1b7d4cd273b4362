"""Loading: model references into modules, data references into samples, and the bundled models."""
