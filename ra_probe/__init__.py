"""ra-probe: Residual Alignment and Neural Collapse diagnostics for residual networks.

    import ra_probe
    report = ra_probe.probe(model, loader, k=16, samples=64)   # an nn.Module, a DataLoader
    report.verdict                                             # {"ra": "present", "nc": "partial"}
    report.to_html("report.html")
"""
from ra_probe.api import Report, check, load_report, probe, register_adapter
from ra_probe.integrations.tracker import Tracker
from ra_probe.load.sources import LoadingOptions, Source, register_source
from ra_probe.pipeline.settings import Settings
from ra_probe.sweeps import sweep
from ra_probe.version import __version__

__all__ = ["LoadingOptions", "Report", "Settings", "Source", "Tracker", "check", "load_report", "probe",
           "register_adapter", "register_source", "sweep", "__version__"]
