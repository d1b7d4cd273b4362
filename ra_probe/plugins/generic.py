"""The generic detector as the `generic` adapter of the entry-point group ra_probe.adapters (the
detector itself lives in `ra_probe.sites.detect`)."""
from ra_probe.sites.detect import GenericDetector

ADAPTER = GenericDetector()
