"""What every benchmark module shares: an op on one input, its implementations checked against
each other once, then each timed in its own test, in one pytest-benchmark group.

A :class:`Case` runs every implementation when it is created (the warm-up), hands the results
to the module's check, and keeps only how long each call took: that decides how each
implementation is timed (see :meth:`Case.measure`). A failed check fails the fixture that creates
the case, so nothing of that op and input is timed.

``extra_info`` of every benchmark carries ``op``, ``catalog``, ``implementation``, ``role``
("ours" or "baseline") and, for baselines, ``target``: the speedup (baseline time / our time)
flower_ext must reach over it. ``report.py`` turns those into the README table.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# Implementations whose warm call took this long are timed with a fixed, small number of
# rounds instead of pytest-benchmark's calibration (at least 5 rounds, more for fast code), so
# that the 1M-item Python baselines run once or twice rather than for minutes.
SLOW_CALL_S = 0.5
SLOW_TIME_BUDGET_S = 15.0
SLOW_MAX_ROUNDS = 5


@dataclass(frozen=True)
class Implementation:
    name: str
    run: Callable[[], Any]
    target: float | None = None  # None for ours; for a baseline, the speedup we must reach

    @property
    def role(self) -> str:
        return "ours" if self.target is None else "baseline"


def ours(name: str, run: Callable[[], Any]) -> Implementation:
    return Implementation(name, run)


def baseline(name: str, run: Callable[[], Any], target: float) -> Implementation:
    return Implementation(name, run, target)


def _timed_call(run: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = run()
    return result, time.perf_counter() - start


class Case:
    """One op on one input (a catalog, or a batch shape for the losses).

    Args:
        op: the op's name in the report ("build", "log_flows", ...).
        catalog: the input's name in the report.
        implementations: ours and the baselines, distinct names.
        check: called with ``{name: result}`` of the warm-up calls; raises when a result
            differs from the one it is compared with.
    """

    def __init__(
        self,
        op: str,
        catalog: str,
        implementations: Sequence[Implementation],
        check: Callable[[Mapping[str, Any]], None],
    ):
        self.op, self.catalog = op, catalog
        self.implementations = {each.name: each for each in implementations}
        self.call_s: dict[str, float] = {}
        results = {}
        for implementation in implementations:
            result, seconds = _timed_call(implementation.run)
            if seconds >= SLOW_CALL_S:
                # A slow first call may be one-time set-up (a torch op's lazy initialisation,
                # the allocator's first page faults): a second call says what a round costs.
                del result
                result, seconds = _timed_call(implementation.run)
            results[implementation.name] = result
            self.call_s[implementation.name] = seconds
        check(results)

    def measure(self, benchmark, name: str) -> None:
        """Times implementation ``name`` with the ``benchmark`` fixture of the calling test."""
        implementation = self.implementations[name]
        benchmark.group = f"{self.op}[{self.catalog}]"
        benchmark.extra_info.update(
            op=self.op,
            catalog=self.catalog,
            implementation=name,
            role=implementation.role,
            target=implementation.target,
        )
        call_s = self.call_s[name]
        if call_s < SLOW_CALL_S:
            benchmark(implementation.run)
            return
        rounds = int(min(SLOW_MAX_ROUNDS, max(1, SLOW_TIME_BUDGET_S // call_s)))
        benchmark.pedantic(implementation.run, rounds=rounds, iterations=1)
