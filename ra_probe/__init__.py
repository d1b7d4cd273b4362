"""ra-probe: Residual Alignment and Neural Collapse diagnostics for residual networks.

    import ra_probe
    report = ra_probe.probe(model, loader, k=16, samples=64)   # an nn.Module, a DataLoader
    report.verdict                                             # {"ra": "present", "nc": "partial"}
    report.to_html("report.html")
"""
__version__ = "0.1.0"

from ra_probe.api import Report, check, load_report, probe, register_adapter  # noqa: E402
from ra_probe.integrations.tracker import Tracker  # noqa: E402
from ra_probe.pipeline.settings import Settings  # noqa: E402
from ra_probe.sweeps import sweep  # noqa: E402

__all__ = ["Report", "Settings", "Tracker", "check", "load_report", "probe", "register_adapter", "sweep",
           "__version__"]
