"""The sites stage: where a model's residual branches are and whether they are what they claim.

records.py   the `Site` an adapter returns (the adapters' contract), what the adapters `Found`, a
             `VerifiedSite`, the `Group`s of sites that chain, a model's `SiteReport`; all frozen
registry.py  adapters from the entry-point group `ra_probe.adapters` and registered at runtime;
             `find_sites` asks them for a model's sites (the adapters live in `ra_probe.plugins`)
detect/      the generic detector, the fallback adapter: residual adds in any module's forward
capture.py   one forward with hooks that records every site's input, branch output and block output
verify.py    each site's branch recomputed from what was captured and checked against the forward
discover.py  the three above on the first samples, after checking that samples do not interact

Third-party adapters import what they need from here."""
from ra_probe.sites.records import (
                                    Adapter,
                                    Branch,
                                    Context,
                                    Found,
                                    Group,
                                    Site,
                                    SiteCall,
                                    SiteReport,
                                    Skipped,
                                    Tap,
                                    VerifiedSite,
)
from ra_probe.sites.registry import find_sites, register_adapter, registered_adapters

__all__ = ["Adapter", "Branch", "Context", "Found", "Group", "Site", "SiteCall", "SiteReport", "Skipped", "Tap",
           "VerifiedSite", "find_sites", "register_adapter", "registered_adapters"]
