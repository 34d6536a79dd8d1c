"""Layering strategies: how a closure is grouped into image layers.

Every strategy is a frozen value satisfying
:class:`~nixery_core.protocols.LayeringStrategy`.  :data:`DEFAULT_STRATEGY`
is the one the image builder uses unless told otherwise; the three
published strategies are here to compare against (see ``docs/layering.md``).
"""

from nixery_core.layering.churn_aware import ChurnAwareDominators
from nixery_core.layering.common import (
    DEFAULT_MAX_LAYERS,
    IndexedGraph,
    check_budget,
    package_name,
    validate_grouping,
)
from nixery_core.layering.metrics import PullingClient, layer_bytes, unique_layer_bytes
from nixery_core.layering.nixery import ALWAYS_POPULAR, NixeryPopularity, PopularityTable
from nixery_core.layering.references import ReferencesByPopularity, route_counts
from nixery_core.layering.size_first import SizeFirst

#: The strategy the image builder uses by default.
DEFAULT_STRATEGY = ChurnAwareDominators()

__all__ = [
    "ALWAYS_POPULAR",
    "DEFAULT_MAX_LAYERS",
    "DEFAULT_STRATEGY",
    "ChurnAwareDominators",
    "IndexedGraph",
    "NixeryPopularity",
    "PopularityTable",
    "PullingClient",
    "ReferencesByPopularity",
    "SizeFirst",
    "check_budget",
    "layer_bytes",
    "package_name",
    "route_counts",
    "unique_layer_bytes",
    "validate_grouping",
]
