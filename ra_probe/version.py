"""The tool's version: the package's lowest module, which every part may import."""
__version__ = "0.1.0"
