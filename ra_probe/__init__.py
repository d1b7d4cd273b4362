"""ra-probe: Residual Alignment and Neural Collapse diagnostics for residual networks."""
__version__ = "0.1.0"
