"""``OnlinePolicy(phase=...)``: the instance a disaggregated deployment runs it in picks the
dispatch kernel as ``solve --phase`` does (SGLang's ``--deepep-mode auto`` per phase); an
unknown phase is one ``InputError``; the default is prefill."""

from __future__ import annotations

import numpy as np

from moeplace.solvers.dispatch import default_kernel
from moeplace.solvers.online import OnlinePolicy
from moeplace.solvers.replay import builtin_policy
from tests.bad_input import raises_input


def test_phase_picks_the_kernel():
    assert OnlinePolicy(4).phase == "prefill" and OnlinePolicy(4).dispatch == "deepep-normal"
    pol = OnlinePolicy(4, phase="decode")
    assert pol.phase == "decode" and pol.dispatch == "deepep-ll" == default_kernel("sglang",
                                                                                    "decode")
    raises_input(lambda: OnlinePolicy(4, phase="extend"), "not a phase", "phase")
    # replay hands the phase to moeplace's policy
    assert builtin_policy("moeplace", 4, 1, 1, phase="decode").policy.dispatch == "deepep-ll"


def test_phase_changes_no_decision_today():
    """Documented: the rule balances GPU load, which both kernels need; the maps are equal."""
    rng = np.random.default_rng(0)
    a, b = OnlinePolicy(4, seed=0), OnlinePolicy(4, phase="decode", seed=0)
    cur = None
    for _ in range(4):
        load = rng.integers(0, 100, (3, 8)).astype(np.float64)
        da, db = a.step(load, cur), b.step(load, cur)
        np.testing.assert_array_equal(da.phy2log, db.phy2log)
        cur = da.phy2log
