"""The generic detector: residual sites in any module, found without knowing its family.

graph.py     each module's own forward traced with torch.fx; residual adds found in its graph
runtime.py   for modules torch.fx cannot trace: the adds watched on a real forward (tensor provenance)
detector.py  `GenericDetector`, the fallback adapter that runs both
common.py    what both share (the adapters too): site names, the norms a post-op may be, cache-free calls"""
from ra_probe.sites.detect.detector import GenericDetector

__all__ = ["GenericDetector"]
