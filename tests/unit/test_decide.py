"""decide(): table-driven cases named by what they show, plus the policy's settings round trip."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from scipy import stats

from control_plane.analysis import power
from control_plane.analysis.aggregates import LatencyHistogram
from control_plane.analysis.decide import decide
from control_plane.analysis.policy import Evidence, Policy, evaluate, harm
from control_plane.analysis.types import Action, ArmObservation, Observations, Phase, RolloutState

SEQ, THR = Policy(), Policy(name="threshold")
HOUR = 3600.0


def latencies(n: int, ratio: float = 1.0) -> tuple[float, ...]:
    """n deterministic log-normal latencies (median 20 ms): their quantiles are exact."""
    u = (np.arange(n) + 0.5) / n
    return tuple(20 * ratio * np.exp(0.4 * stats.norm.ppf(u)))


def arm(
    n: int,
    accuracy: float,
    error_rate: float = 0.005,
    lat_ratio: float = 1.0,
    labelled: int | None = None,
    step_requests: int | None = None,
) -> ArmObservation:
    """One role's window with round counts."""
    labelled = n if labelled is None else labelled
    return ArmObservation(
        version=1,
        requests=n,
        errors=round(n * error_rate),
        latency=LatencyHistogram.of(latencies(n, lat_ratio)),
        labelled=labelled,
        correct=round(labelled * accuracy),
        step_requests=n if step_requests is None else step_requests,
    )


def observations(
    canary: ArmObservation,
    baseline: ArmObservation,
    weight: int,
    now: float = 2 * HOUR,
    step_requests: dict[str, int] | None = None,
) -> Observations:
    """Baseline, canary and a 5% control, with step counts that match the weights unless given."""
    weights = {"baseline": 95 - weight, "canary": weight, "control": 5}
    total = canary.step_requests + baseline.step_requests
    steps = step_requests or {r: round(total * w / (100 - 5)) for r, w in weights.items()}
    arms = {
        "canary": dataclasses.replace(canary, step_requests=steps["canary"]),
        "baseline": dataclasses.replace(baseline, step_requests=steps["baseline"]),
        "control": dataclasses.replace(arm(steps["control"], 0.7), step_requests=steps["control"]),
    }
    return Observations(now=now, window_start=0.0, window_end=now, arms=arms, step_weights=weights)


def state(
    step: int = 2,
    started: float = 0.0,
    step_started: float = 0.0,
    phase: Phase = Phase.PROGRESSING,
    running_p: float | None = None,
) -> RolloutState:
    weight = SEQ.steps[step]
    extra = {} if running_p is None else {"accuracy_superiority": running_p}
    return RolloutState(phase, step, weight, started, step_started, running_p_values=extra)


BIG_C, BIG_B = 60_000, 54_000  # an hour or more at the last step: enough for every test to decide


CASES = [
    # (name, policy, state, observations, action, next weight, words in the reason)
    (
        "promotes when accuracy is confidently better by the margin and both guardrails hold",
        SEQ,
        state(),
        observations(arm(BIG_C, 0.81), arm(BIG_B, 0.78), 50),
        Action.PROMOTE,
        100,
        ["+3.0 pts", "exceeds margin 1.0"],
    ),
    (
        "holds at the last step while the gain is not yet shown above the margin",
        SEQ,
        state(),
        observations(arm(8_000, 0.795), arm(7_200, 0.78), 50),
        Action.HOLD,
        50,
        ["not yet above"],
    ),
    (
        "advances from an earlier step once it has run its minimum and nothing is harmful",
        SEQ,
        state(step=0),
        observations(arm(2_000, 0.78), arm(17_000, 0.78), 10),
        Action.ADVANCE,
        25,
        ["no harm", "advancing to 25%"],
    ),
    (
        "holds until the step has lasted its minimum duration",
        SEQ,
        state(step=0, step_started=2 * HOUR - 120),
        observations(arm(2_000, 0.78), arm(17_000, 0.78), 10),
        Action.HOLD,
        10,
        ["120 s of the 300 s"],
    ),
    (
        "holds while there are fewer labels than the power calculation asks for",
        SEQ,
        state(step=0),
        observations(arm(2_000, 0.78, labelled=300), arm(17_000, 0.78), 10),
        Action.HOLD,
        10,
        ["waiting for data"],
    ),
    (
        "rolls back when canary errors are significantly worse, before any label",
        SEQ,
        state(step=0),
        observations(arm(240, 0.78, error_rate=0.055, labelled=0), arm(2_040, 0.78, labelled=0), 10),
        Action.ROLLBACK,
        0,
        ["errors", "rolling back"],
    ),
    (
        "rolls back when the canary's p99 is confidently above 1.05 times the baseline's",
        SEQ,
        state(step=0),
        observations(arm(3_000, 0.78, lat_ratio=1.3, labelled=0), arm(25_000, 0.78, labelled=0), 10),
        Action.ROLLBACK,
        0,
        ["p99", "confidently above 1.05"],
    ),
    (
        "rolls back when canary accuracy is confidently worse than the baseline's",
        SEQ,
        state(),
        observations(arm(BIG_C, 0.75), arm(BIG_B, 0.78), 50),
        Action.ROLLBACK,
        0,
        ["confidently below the baseline"],
    ),
    (
        "rolls back when the gain is confidently below the margin, since it can never be promoted",
        SEQ,
        state(),
        observations(arm(BIG_C, 0.782), arm(BIG_B, 0.78), 50),
        Action.ROLLBACK,
        0,
        ["cannot be promoted"],
    ),
    (
        "halts on a sample-ratio mismatch and never promotes",
        SEQ,
        state(),
        observations(
            arm(BIG_C, 0.81),
            arm(BIG_B, 0.78),
            50,
            step_requests={"canary": 40_000, "baseline": 50_000, "control": 5_000},
        ),
        Action.HALT,
        0,
        ["sample-ratio mismatch", "nothing is promoted"],
    ),
    (
        "is inconclusive when the time limit passes without a decision",
        SEQ,
        state(started=-5 * HOUR),
        observations(arm(8_000, 0.795), arm(7_200, 0.78), 50),
        Action.INCONCLUSIVE,
        0,
        ["inconclusive", "7.0 h"],
    ),
    (
        "does not promote on an early low p-value the current data no longer support (no lock-in)",
        SEQ,
        state(running_p=0.001),
        observations(arm(BIG_C, 0.795), arm(BIG_B, 0.78), 50),
        Action.HOLD,
        50,
        ["running p=0.33", "not yet above margin"],
    ),
    (
        "threshold: promotes at the last step on point estimates over the margin",
        THR,
        state(),
        observations(arm(5_000, 0.795), arm(4_500, 0.78), 50),
        Action.PROMOTE,
        100,
        ["+1.5 pts exceeds margin 1.0"],
    ),
    (
        "threshold: advances at an earlier step when the three rules pass",
        THR,
        state(step=1),
        observations(arm(5_000, 0.795), arm(14_000, 0.78), 25),
        Action.ADVANCE,
        50,
        ["advancing to 50%"],
    ),
    (
        "threshold: holds when the gain does not exceed the margin",
        THR,
        state(),
        observations(arm(5_000, 0.785), arm(4_500, 0.78), 50),
        Action.HOLD,
        50,
        ["does not exceed margin"],
    ),
    (
        "threshold: rolls back when errors are more than twice the margin worse",
        THR,
        state(),
        observations(arm(5_000, 0.80, error_rate=0.02), arm(4_500, 0.78), 50),
        Action.ROLLBACK,
        0,
        ["more than twice"],
    ),
    (
        "threshold: decides nothing before the minimum sample, not even a rollback",
        THR,
        state(step=0),
        observations(arm(240, 0.78, error_rate=0.055, labelled=0), arm(2_040, 0.78, labelled=0), 10),
        Action.HOLD,
        10,
        ["waiting for data"],
    ),
]


@pytest.mark.parametrize("name, policy, st, obs, action, weight, words", CASES, ids=[c[0] for c in CASES])
def test_decide(name, policy, st, obs, action, weight, words):
    d = decide(st, obs, policy)
    assert d.action is action, d.reason
    assert d.next_weight == weight
    for word in words:
        assert word in d.reason, d.reason
    json.dumps(d.stats, allow_nan=False)  # stored as JSON: plain numbers, no NaN or infinity
    assert d.stats["policy"] == policy.name
    assert all(r.value is None or np.isfinite(r.value) for r in d.rules)


@pytest.mark.parametrize(
    "phase",
    [Phase.PROMOTED, Phase.ROLLED_BACK, Phase.HALTED, Phase.INCONCLUSIVE, Phase.PAUSED, Phase.PENDING],
)
def test_does_nothing_outside_a_progressing_rollout(phase):
    d = decide(state(phase=phase), observations(arm(BIG_C, 0.81), arm(BIG_B, 0.78), 50), SEQ)
    assert d.action is Action.HOLD and d.next_weight == 50


def test_reports_no_data_when_an_arm_is_missing():
    obs = observations(arm(BIG_C, 0.81), arm(BIG_B, 0.78), 50)
    obs = dataclasses.replace(obs, arms={"baseline": obs.arms["baseline"]})
    d = decide(state(), obs, SEQ)
    assert d.action is Action.NO_DATA and "canary" in d.reason


def test_a_promotion_records_estimates_intervals_and_p_values():
    d = decide(state(), observations(arm(BIG_C, 0.81), arm(BIG_B, 0.78), 50), SEQ)
    acc, err, lat = d.stats["accuracy"], d.stats["errors"], d.stats["latency"]
    assert acc["lower"] < acc["diff"] < acc["upper"] and acc["p_superior"] <= 0.05
    assert err["upper"] < 0.005 and err["p_noninferior"] <= 0.05
    assert lat["upper"] <= 1.05 and d.stats["srm"]["p"] > 0.001
    assert d.stats["running_p_values"]["accuracy_superiority"] == acc["p_superior"]
    passed = {r.name: r.passed for r in d.rules}
    assert (
        passed["accuracy_superiority"] and passed["error_noninferiority"] and passed["latency_noninferiority"]
    )


def test_halts_instead_of_promoting_when_the_split_looks_mismatched():
    skewed = {"canary": 50_500, "baseline": 44_000, "control": 5_000}  # fixed chi-square p < 0.001
    d = decide(state(), observations(arm(BIG_C, 0.81), arm(BIG_B, 0.78), 50, step_requests=skewed), SEQ)
    assert d.action is Action.HALT


def test_policy_round_trips_through_a_dict():
    for p in (Policy(), Policy(name="threshold", steps=(5, 50)), Policy.fast()):
        assert Policy.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    assert Policy.from_dict({}) == Policy() and Policy().name == "sequential"


@pytest.mark.parametrize(
    "data, field",
    [
        ({"name": "bayes"}, "name"),
        ({"steps": [50, 25]}, "steps"),
        ({"steps": []}, "steps"),
        ({"steps": "10,25"}, "steps"),
        ({"alpha": 0.7}, "alpha"),
        ({"harm_alpha": 0}, "harm_alpha"),
        ({"p99_ratio": 0.9}, "p99_ratio"),
        ({"min_labelled_per_arm": 0}, "min_labelled_per_arm"),
        ({"min_latency_samples": 20}, "min_latency_samples"),
        ({"max_duration_s": "six hours"}, "max_duration_s"),
        ({"accuracy_margin": True}, "accuracy_margin"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_policy_rejects_bad_settings_naming_the_field(data, field):
    with pytest.raises(ValueError, match=field):
        Policy.from_dict(data)


def test_sample_sizes_come_from_a_power_calculation():
    # (z_0.95 + z_0.8)^2 (0.8*0.2 + 0.78*0.22) / 0.01^2
    want = (stats.norm.ppf(0.95) + stats.norm.ppf(0.8)) ** 2 * (0.16 + 0.78 * 0.22) / 0.01**2
    assert Policy().planned_n == power.samples_per_arm(0.78, 0.02, 0.01) == int(np.ceil(want))
    assert Policy().labelled_minimum == power.minimum_labelled(0.78) < Policy().planned_n
    assert Policy(expected_n=5_000, min_labelled_per_arm=50).planned_n == 5_000
    with pytest.raises(ValueError):
        power.samples_per_arm(0.78, 0.01, 0.01)


def test_window_starts_at_the_rollout_for_sequential_and_rolls_for_threshold():
    assert SEQ.window_start(100.0, 10_000.0) == 100.0
    assert THR.window_start(100.0, 10_000.0) == 10_000.0 - THR.window_s


def test_the_policy_says_which_rule_it_follows_and_stores_its_name():
    assert SEQ.is_sequential and not THR.is_sequential
    assert Policy.from_dict(THR.to_dict()).name == "threshold" == THR.to_dict()["name"]


def two_rollouts() -> Evidence:
    """The rules' arrays for two rollouts: one an hour into its last step, one a minute into its first."""
    cols = dict(
        requests_c=[5000, 50],
        errors_c=[10, 0],
        requests_b=[5000, 50],
        errors_b=[10, 0],
        labelled_c=[4000, 10],
        correct_c=[3400, 8],
        labelled_b=[4000, 10],
        correct_b=[3100, 8],
        latencies_c=[5000, 50],
        latencies_b=[5000, 50],
        p99_ratio=[1.0, 1.0],
        p99_ratio_lower=[0.9, 0.9],
        p99_ratio_upper=[1.01, 1.01],
        srm_p=[1.0, 1.0],
        srm_p_fixed=[1.0, 1.0],
        elapsed_s=[HOUR, 60.0],
        step_elapsed_s=[HOUR, 60.0],
        step_index=[2, 0],
        running_p=[1.0, 1.0],
    )
    return Evidence(**{k: np.asarray(v, dtype=float) for k, v in cols.items()})


def test_rule_statistics_are_typed_one_element_per_rollout_and_the_threshold_rule_runs_no_tests():
    _, _, st = evaluate(SEQ, two_rollouts())
    assert st.enough_labels.tolist() == [True, False] and st.p_superior.shape == (2,)
    one = st.first()
    assert isinstance(one.enough_labels, bool) and isinstance(one.p_superior, float)
    assert one.p_superior == float(st.p_superior[0]) and one.enough_labels is True
    _, _, thr = evaluate(THR, two_rollouts())
    assert thr.p_superior is None and thr.first().p_superior is None and thr.superior is not None


def test_the_harm_tests_are_typed_and_clear_a_canary_no_worse_than_the_baseline():
    h = harm(SEQ, two_rollouts())
    assert h.err_harm.tolist() == [False, False] and h.lat_harm.tolist() == [False, False]
    assert h.err["p_harm"].shape == (2,)
    worse = dataclasses.replace(two_rollouts(), errors_c=np.array([60.0, 0.0]))
    assert harm(SEQ, worse).err_harm.tolist() == [True, False]


def test_errors_roll_back_at_the_harm_alpha_not_the_promotion_alpha():
    # 7 errors in 240 canary requests against 0.5% on the baseline: always-valid p of harm is about 0.14
    obs = observations(arm(240, 0.78, error_rate=7 / 240), arm(2_160, 0.78), 10, now=120.0)
    st = state(step=0, step_started=0.0)
    d = decide(st, obs, SEQ)
    assert d.action is Action.ROLLBACK and "confidently worse" in d.reason, d.reason
    rule = {r.name: r for r in d.rules}["error_harm"]
    assert SEQ.alpha < rule.value <= SEQ.harm_alpha == rule.threshold and rule.passed is False
    strict = decide(st, obs, dataclasses.replace(SEQ, harm_alpha=SEQ.alpha))
    assert strict.action is not Action.ROLLBACK, strict.reason
