"""Where the report keeps what is not a field of the same name in its typed result: shared by the
writer (`build`) and the reader (`view`)."""
from __future__ import annotations

from ra_probe.metrics.results import NC_VALUES

# each RA headline number's field in its section of `metrics` (also under the null's sections)
HEADLINE_FIELDS = {"ra1": "mean_linearity", "ra2": "mean_score", "ra3": "median_rank", "ra4": "L_times_mean_sigma1"}
NULL_NC = (*NC_VALUES, "nc1_ci", "classes", "samples")  # what the report keeps of the null's NC
