"""The solver protocol and the table of methods.

A method is one ``Solver`` subclass, decorated with ``@register`` in the module that owns its
algorithm; it declares what it supports (replicas, the co-activation and migration terms, proven
bounds) and ``solve_with_report`` refuses requests it cannot serve before it runs, scores what
it returns and bounds it. ``SolveOptions`` carries everything a method reads besides the
statistics and the cluster.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from moeplace.errors import InputError
from moeplace.placement import Placement
from moeplace.solvers.objective import Weights
from moeplace.traces import RoutingStats


@dataclass(frozen=True)
class Cluster:
    """GPUs, nodes, and redundant expert copies per layer."""

    num_gpus: int
    num_nodes: int = 1
    replicas: int = 0


# ``runner(fn, stats, start, restarts, seed, kw)`` runs ``fn(stats, start, seed=seed + i, **kw)``
# for i < restarts somewhere else (e.g. Ray tasks, see moeplace.service.fleet), each within its
# share of ``kw["time_limit"]`` when they cannot all run at once, and returns their
# ``(placement, report)`` results in seed order. ``fn`` is a module-level function (picklable).
RestartRunner = Callable[[Callable[..., Any], RoutingStats, Placement, int, int, dict[str, Any]],
                         list[Any]]


def reserve_seconds(time_limit: float) -> float:
    """Seconds of a solve's budget kept for scoring and bounds after the method returns."""
    return min(5.0, 0.1 * time_limit)


@dataclass(frozen=True)
class SolveOptions:
    """Everything a method reads besides the statistics and the cluster.

    ``solve_with_report`` builds it (the one place a new option is threaded through) and sets
    ``deadline`` when the solve starts.
    """

    weights: Weights = Weights()
    time_limit: float = 60.0
    # time.monotonic() by which the whole solve (method, scoring, bounds) ends; None: not started
    deadline: float | None = None
    balance_slack: float = 0.0
    current: Placement | None = None  # the placement serving now (migration term)
    seed: int = 0
    num_groups: int | None = None  # the model's expert groups, for EPLB's hierarchical policy
    restarts: int | None = None
    restart_runner: RestartRunner | None = None
    # the engine the placement is for, which picks the traffic objective (objective.ENGINES)
    engine: str = "sglang"
    # "decode": balance the expected active experts per step of tokens_per_step tokens
    phase: str = "prefill"
    tokens_per_step: int = 4096
    gpu_speeds: tuple[float, ...] | None = None  # per-GPU speed factors (None: all equal)
    # the dispatch kernel whose copies the report bounds (dispatch.KERNELS; None: the engine
    # and phase's, dispatch.default_kernel) and the simulator's (Hardware, ModelShape) that
    # prices them (None: no time bound)
    kernel: str | None = None
    sim: tuple[Any, Any] | None = None

    def started(self) -> SolveOptions:
        """These options with the deadline ``time_limit`` seconds from now."""
        return replace(self, deadline=time.monotonic() + self.time_limit)

    def seconds_left(self) -> float:
        """Seconds until the deadline (the whole time limit when not started)."""
        if self.deadline is None:
            return self.time_limit
        return self.deadline - time.monotonic()

    def budget(self, floor: float) -> float:
        """Seconds a method may spend now: what is left less the reserve for scoring and
        bounds, but at least ``floor`` (a method out of time still returns its start)."""
        return max(self.seconds_left() - reserve_seconds(self.time_limit), floor)


@dataclass
class MethodResult:
    """What a method says about its placement; ``solve_with_report`` scores and bounds it.

    ``bound`` is a proven lower bound on the objective's total (only read from methods that
    declare ``exact``); ``details`` go to the report as they are. ``balance_checked``: the
    method already held its layers to EPLB's balance on the held-back request buckets (the
    static search), so ``solve_with_report`` only measures it (``solvers.heldout``).
    """

    status: str
    bound: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
    balance_checked: bool = False


class Solver(ABC):
    """One placement method. Capabilities are class attributes; defaults refuse everything.

    - ``replicas``: places redundant copies (``Cluster.replicas > 0``);
    - ``coact``: accepts a co-activation weight (``Weights.coact``);
    - ``migration``: accepts a migration weight with a current placement;
    - ``exact``: may prove a lower bound (``MethodResult.bound``) or optimality;
    - ``baseline``: a reference layout; it optimises no term, so the weights never refuse it;
    - ``rank``: position in listings such as ``--method``'s choices (lower first).
    """

    name: ClassVar[str]
    replicas: ClassVar[bool] = False
    coact: ClassVar[bool] = False
    migration: ClassVar[bool] = False
    exact: ClassVar[bool] = False
    baseline: ClassVar[bool] = False
    # engines whose traffic objective the method optimises (objective.ENGINES); a method run
    # for another engine is scored on the first of these
    engines: ClassVar[tuple[str, ...]] = ("exflow",)
    # balances per-expert costs other than token counts (phase decode) on GPUs of unequal speed
    costs: ClassVar[bool] = False
    rank: ClassVar[int] = 1000

    @abstractmethod
    def solve(self, stats: RoutingStats, cluster: Cluster, options: SolveOptions
              ) -> tuple[Placement, MethodResult]:
        """A placement of ``stats`` on ``cluster`` within ``options.deadline``."""


_TABLE: dict[str, type[Solver]] = {}


def register(cls: type[Solver]) -> type[Solver]:
    """Class decorator: make ``cls`` callable as ``solve_with_report(method=cls.name)``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"{cls.__qualname__}.name must be a non-empty method name other than "
                         f"'auto', not {name!r}")
    if name in _TABLE and _TABLE[name] is not cls:
        raise ValueError(f"method {name!r} is already registered by "
                         f"{_TABLE[name].__module__}.{_TABLE[name].__qualname__}")
    if getattr(cls, "__abstractmethods__", None):
        raise ValueError(f"{cls.__qualname__} does not implement solve()")
    _TABLE[name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove a method (tests and plugins that registered one for a while)."""
    _TABLE.pop(name, None)


def names(*, baseline: bool | None = None) -> tuple[str, ...]:
    """Registered methods by rank (ties in registration order); ``baseline`` filters.

    The built-in methods register when ``moeplace.solvers`` is imported."""
    ordered = sorted(_TABLE.values(), key=lambda c: c.rank)  # stable: registration order
    return tuple(c.name for c in ordered if baseline is None or c.baseline == baseline)


def get(name: str) -> Solver:
    """The method called ``name``; unknown names are an ``InputError`` listing the known."""
    cls = _TABLE.get(name)
    if cls is None:
        raise InputError("solve", "--method", f"unknown method {name!r}",
                         f"use one of {names()}")
    return cls()


def _supporting(flag: str, *, baselines: bool) -> str:
    ok = [n for n in names() if getattr(_TABLE[n], flag) and (baselines or not _TABLE[n].baseline)]
    return ", ".join(ok) if ok else "none"


def check_supported(solver: Solver, cluster: Cluster, options: SolveOptions) -> None:
    """Refuse, in one line naming the flag, what ``solver`` does not declare it supports."""
    name = solver.name
    if cluster.replicas and not solver.replicas:
        raise InputError("solve", "--replicas", f"--method {name} places each expert once",
                         f"use --method auto or one of {_supporting('replicas', baselines=True)}"
                         " with --replicas")
    if solver.baseline:
        return  # a reference layout: the report scores every term, the method optimises none
    if (options.phase != "prefill" or options.gpu_speeds is not None) and not solver.costs:
        flag = "--gpu-speeds" if options.gpu_speeds is not None else "--phase"
        raise InputError("solve", flag, f"--method {name} balances token counts on equal GPUs",
                         f"use --method {_supporting('costs', baselines=False)} with {flag}")
    if options.weights.coact and not solver.coact:
        raise InputError("solve", "--weights", f"--method {name} has no co-activation term",
                         f"use --method {_supporting('coact', baselines=False)} with coact=")
    if options.current is not None and options.weights.migration and not solver.migration:
        raise InputError("solve", "--current", f"--method {name} has no migration term",
                         f"use --method {_supporting('migration', baselines=False)} with "
                         "--current")


__all__ = ["Cluster", "MethodResult", "RestartRunner", "SolveOptions", "Solver", "check_supported",
           "get", "names", "register", "reserve_seconds", "unregister"]
