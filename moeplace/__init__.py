"""moeplace: decide where the experts of a Mixture-of-Experts model live across GPUs."""

from moeplace import _interrupts

if _interrupts.running_as_cli():  # before the imports below, which take seconds on a busy machine
    _interrupts.install_early()

from moeplace.errors import InfeasibleError, InputError, MissingDependencyError, MoeplaceError
from moeplace.placement import Placement
from moeplace.traces import RoutingStats, Trace, TraceMeta, compute_stats, import_trace, read_trace

__version__ = "0.1.0"

__all__ = [
    "InfeasibleError",
    "InputError",
    "MissingDependencyError",
    "MoeplaceError",
    "Placement",
    "RoutingStats",
    "Trace",
    "TraceMeta",
    "__version__",
    "compute_stats",
    "import_trace",
    "read_trace",
]
