"""`recsys simulate`: replay both policies on the same synthetic streams with known truth, many times over.

Every replication is a rollout evaluated once a minute: Poisson arrivals split by the step's weights, errors,
labels that arrive `label_delay_s` later, and log-normal latencies. The policies' own rules
(`policy.evaluate`) decide, vectorised over replications, so what is measured here is what runs in production.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy import special

from control_plane.analysis import guardrails, srm
from control_plane.analysis.policy import (
    ADVANCE,
    HALT,
    INCONCLUSIVE,
    PROMOTE,
    ROLLBACK,
    Cause,
    Evidence,
    Policy,
    evaluate,
)

Q = 0.99  # the latency quantile the guardrail is about


@dataclass(frozen=True)
class Scenario:
    """The truth of one stream: how the canary differs from the baseline."""

    name: str
    lift: float = 0.0  # canary minus baseline accuracy
    error_diff: float = 0.0  # canary minus baseline error rate
    latency_ratio: float = 1.0  # canary latencies are this times the baseline's (so is its p99)
    srm_loss: float = 0.0  # share of canary requests missing from the log (a sample-ratio mismatch)

    def better(self, policy: Policy) -> bool:
        """The truth is better by the margin with both guardrails intact (a promotion is not false)."""
        return (
            self.lift > policy.accuracy_margin
            and self.error_diff <= policy.error_margin
            and self.latency_ratio <= policy.p99_ratio
        )


@dataclass(frozen=True)
class Traffic:
    """The stream's shape, shared by every scenario."""

    rate_per_s: float = 20.0
    eval_interval_s: float = 60.0  # continuous looking: every minute
    label_delay_s: float = 300.0  # a prediction counts as labelled once its label window has closed
    base_accuracy: float = 0.78
    base_error_rate: float = 0.005
    latency_median_ms: float = 20.0
    latency_sigma: float = 0.4  # log-normal: p99 is about 2.5 x the median
    control_weight: int = 5


SCENARIOS = (
    Scenario("A/A"),
    Scenario("accuracy -2 pts", lift=-0.02),
    Scenario("accuracy -1 pt", lift=-0.01),
    Scenario("accuracy +0.5 pt", lift=0.005),
    Scenario("accuracy +1 pt (at margin)", lift=0.01),
    Scenario("accuracy +1.5 pts", lift=0.015),
    Scenario("accuracy +2 pts", lift=0.02),
    Scenario("accuracy +3 pts", lift=0.03),
    Scenario("accuracy +4 pts", lift=0.04),
    Scenario("+3 pts but errors +1 pt", lift=0.03, error_diff=0.01),
    Scenario("+3 pts but p99 x1.10", lift=0.03, latency_ratio=1.10),
    Scenario("errors +0.5 pt (at margin)", error_diff=0.005),
    Scenario("errors +5 pts", error_diff=0.05),
    Scenario("p99 x1.30", latency_ratio=1.30),
    Scenario("SRM: A/A, 5% of canary requests lost", srm_loss=0.05),
    Scenario("SRM: +2 pts, 5% of canary requests lost", lift=0.02, srm_loss=0.05),
)


@dataclass(frozen=True)
class Outcome:
    """Per replication: final action code, its cause, when (s) and at which evaluation."""

    action: np.ndarray
    cause: np.ndarray
    time_s: np.ndarray
    evals: np.ndarray


class _TailGrid:
    """Latencies above the baseline's 97th percentile, binned finely in log space (below: only counted)."""

    def __init__(self, traffic: Traffic, bins: int = 256, width: float = 0.004):
        self.mu, self.sigma = np.log(traffic.latency_median_ms), traffic.latency_sigma
        self.lo, self.bins, self.width = self.mu + self.sigma * special.ndtri(0.97), bins, width

    def sample(self, rng: np.random.Generator, n: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray]:
        """New latencies of n requests per replication: (count below the grid, counts per bin + overflow)."""
        a = special.ndtr((self.lo - self.mu - np.log(ratio)) / self.sigma)
        tail = rng.binomial(n, 1.0 - a)
        u = rng.uniform(a, 1.0, int(tail.sum()))
        x = self.mu + np.log(ratio) + self.sigma * special.ndtri(u)
        idx = np.clip(((x - self.lo) / self.width).astype(np.int64), 0, self.bins)
        rows = np.repeat(np.arange(len(n)), tail)
        counts = np.bincount(rows * (self.bins + 1) + idx, minlength=len(n) * (self.bins + 1))
        return n - tail, counts.reshape(len(n), self.bins + 1)

    def order_stat(self, under: np.ndarray, counts: np.ndarray, k: np.ndarray, upper: bool) -> np.ndarray:
        """The k-th smallest latency (1-based) per replication; conservative outside the grid."""
        n = under + counts.sum(axis=1)
        cum = np.cumsum(counts, axis=1)
        j = np.clip(k - under, 1, None)
        idx = np.minimum((cum < j[:, None]).sum(axis=1), self.bins)
        value = np.exp(self.lo + (idx + 0.5) * self.width)
        value = np.where(idx >= self.bins, np.inf, value)  # overflow: beyond the grid
        below = np.exp(self.lo) if upper else 0.0  # inside the uncounted bulk: only "below the grid" is known
        value = np.where(k <= under, below, value)
        return np.where(k < 1, 0.0, np.where(k > n, np.inf, value))

    def p99(self, under: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Point estimate of the p99 (the ceil(0.99 n)-th smallest)."""
        n = under + counts.sum(axis=1)
        return self.order_stat(under, counts, np.maximum(np.ceil(n * Q), 1), upper=True)

    def bounds(
        self, under: np.ndarray, counts: np.ndarray, alpha: float, expected_n: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """Always-valid lower and upper bound of the p99, each one-sided at alpha."""
        n = under + counts.sum(axis=1)
        lo_k, hi_k = guardrails.quantile_ranks(n, Q, alpha, expected_n)
        return self.order_stat(under, counts, lo_k, upper=False), self.order_stat(
            under, counts, hi_k, upper=True
        )


def run_scenario(scenario: Scenario, policy: Policy, traffic: Traffic, reps: int, seed: int) -> Outcome:
    """Replay one policy on `reps` independent streams of one scenario until every rollout has ended."""
    rng = np.random.default_rng(seed)
    grid = _TailGrid(traffic)
    dt, steps = traffic.eval_interval_s, np.array(policy.steps)
    horizon = int(np.ceil(policy.max_duration_s / dt)) + 1
    delay = int(np.ceil(traffic.label_delay_s / dt))
    win = int(np.ceil(policy.window_s / dt))
    acc = {"c": traffic.base_accuracy + scenario.lift, "b": traffic.base_accuracy}
    err = {"c": traffic.base_error_rate + scenario.error_diff, "b": traffic.base_error_rate}
    ratio = {"c": scenario.latency_ratio, "b": 1.0}
    # cumulative counts after each minute, row 0 = the start: requests, errors, successes (labelled later), correct
    hist = {(a, m): np.zeros((horizon + 1, reps), np.int64) for a in "cb" for m in ("n", "e", "s", "k")}
    lat_under = {a: np.zeros(reps, np.int64) for a in "cb"}
    lat_bins = {a: np.zeros((reps, grid.bins + 1), np.int64) for a in "cb"}
    ring = (
        {a: np.zeros((win + 1, reps, grid.bins + 2), np.int32) for a in "cb"}
        if policy.name == "threshold"
        else {}
    )
    step_idx = np.zeros(reps, np.int64)
    step_start = np.zeros(reps)
    step_req = np.zeros((reps, 3), np.int64)  # baseline, canary, control
    running = np.ones(reps)
    active = np.ones(reps, bool)
    out_action, out_cause = np.full(reps, -1), np.full(reps, -1)
    out_time, out_evals = np.full(reps, np.nan), np.zeros(reps, np.int64)
    for t in range(1, horizon + 1):
        now = t * dt
        w_c = steps[step_idx]
        w = {"c": w_c, "b": 100 - w_c - traffic.control_weight}
        lam = traffic.rate_per_s * dt / 100.0
        n_k = rng.poisson(lam * traffic.control_weight, reps)
        for a in "cb":
            n = rng.poisson(lam * w[a])
            if a == "c" and scenario.srm_loss:
                n = rng.binomial(n, 1.0 - scenario.srm_loss)
            e = rng.binomial(n, err[a])
            k = rng.binomial(n - e, acc[a])
            for m, v in (("n", n), ("e", e), ("s", n - e), ("k", k)):
                hist[a, m][t] = hist[a, m][t - 1] + v
            under, counts = grid.sample(rng, n, ratio[a])
            lat_under[a] += under
            lat_bins[a] += counts
            if ring:
                ring[a][t % (win + 1), :, 0] = lat_under[a]
                ring[a][t % (win + 1), :, 1:] = lat_bins[a]
            step_req[:, 1 if a == "c" else 0] += n
        step_req[:, 2] += n_k
        weights = np.stack([w["b"], w["c"], np.full(reps, traffic.control_weight)], axis=1)
        ev = _evidence(policy, grid, hist, lat_under, lat_bins, ring, t, delay, win)
        ev = replace(
            ev,
            srm_p=srm.always_valid_srm_p(step_req, weights, policy.planned_n, policy.srm_p),
            srm_p_fixed=srm.srm_p_values(step_req, weights),
            elapsed_s=np.full(reps, now),
            step_elapsed_s=now - step_start,
            step_index=step_idx.astype(float),
            running_p=running,
        )
        action, cause, stats = evaluate(policy, ev)
        done = active & np.isin(action, (PROMOTE, ROLLBACK, HALT, INCONCLUSIVE))
        out_action[done], out_cause[done], out_time[done], out_evals[done] = action[done], cause[done], now, t
        adv = active & (action == ADVANCE)
        step_idx = np.where(adv, np.minimum(step_idx + 1, len(steps) - 1), step_idx)
        step_start = np.where(adv, now, step_start)
        step_req[adv] = 0
        if "p_superior" in stats:
            running = np.where(active, stats["p_superior"], running)
        active &= ~done
        if not active.any():
            break
    return Outcome(out_action, out_cause, out_time, out_evals)


def _evidence(
    policy: Policy,
    grid: _TailGrid,
    hist: dict[tuple[str, str], np.ndarray],
    lat_under: dict[str, np.ndarray],
    lat_bins: dict[str, np.ndarray],
    ring: dict[str, np.ndarray],
    t: int,
    delay: int,
    win: int,
) -> Evidence:
    """The rule's inputs at minute t: all data since the start (sequential) or the rolling window (threshold)."""
    lab_t = max(t - delay, 0)
    start = max(t - win, 0) if ring else 0

    def since(a: str, m: str, until: int) -> np.ndarray:
        return (hist[a, m][until] - hist[a, m][min(start, until)]).astype(float)

    if ring:
        lat = {}
        for a in "cb":
            old = ring[a][start % (win + 1)] if t > win else np.zeros_like(ring[a][0])
            lat[a] = (lat_under[a] - old[:, 0], lat_bins[a] - old[:, 1:])
    else:
        lat = {a: (lat_under[a], lat_bins[a]) for a in "cb"}
    p99 = {a: grid.p99(*lat[a]) for a in "cb"}
    n_lat = {a: (lat[a][0] + lat[a][1].sum(axis=1)).astype(float) for a in "cb"}
    if policy.name == "sequential":
        a, ha = policy.alpha / 2, policy.harm_alpha / 2
        lo_c, _ = grid.bounds(*lat["c"], ha, policy.harm_expected_n)
        _, hi_b = grid.bounds(*lat["b"], ha, policy.harm_expected_n)
        _, hi_c = grid.bounds(*lat["c"], a, policy.planned_n)
        lo_b, _ = grid.bounds(*lat["b"], a, policy.planned_n)
        lower, _ = guardrails.ratio_bounds(lo_c, 0.0, 1.0, hi_b)
        _, upper = guardrails.ratio_bounds(0.0, hi_c, lo_b, 1.0)
    else:
        lower, upper = np.zeros_like(p99["c"]), np.full_like(p99["c"], np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        point = np.where(p99["b"] > 0, p99["c"] / p99["b"], np.inf)
    zeros = np.zeros_like(point)
    return Evidence(
        requests_c=since("c", "n", t),
        errors_c=since("c", "e", t),
        requests_b=since("b", "n", t),
        errors_b=since("b", "e", t),
        labelled_c=since("c", "s", lab_t),
        correct_c=since("c", "k", lab_t),
        labelled_b=since("b", "s", lab_t),
        correct_b=since("b", "k", lab_t),
        latencies_c=n_lat["c"],
        latencies_b=n_lat["b"],
        p99_ratio=point,
        p99_ratio_lower=lower,
        p99_ratio_upper=upper,
        srm_p=zeros + 1.0,
        srm_p_fixed=zeros + 1.0,
        elapsed_s=zeros,
        step_elapsed_s=zeros,
        step_index=zeros,
        running_p=zeros + 1.0,
    )


def false_rollback(scenario: Scenario, policy: Policy, out: Outcome) -> np.ndarray:
    """Per replication: stopped for a reason the truth does not support."""
    rb, c = out.action == ROLLBACK, out.cause
    wrong = (
        ((c == Cause.ERRORS) & (scenario.error_diff <= policy.error_margin))
        | ((c == Cause.LATENCY) & (scenario.latency_ratio <= policy.p99_ratio))
        | ((c == Cause.ACCURACY_WORSE) & (scenario.lift >= 0))
        | ((c == Cause.FUTILITY) & (scenario.lift > policy.accuracy_margin))
    )
    halted_wrongly = (out.action == HALT) & (scenario.srm_loss == 0)
    return (rb & wrong) | halted_wrongly


def summarize(scenario: Scenario, policy: Policy, out: Outcome) -> dict:
    """The table row of one scenario under one policy."""
    share = {
        k: float(np.mean(out.action == v))
        for k, v in (
            ("promoted", PROMOTE),
            ("rolled_back", ROLLBACK),
            ("halted", HALT),
            ("inconclusive", INCONCLUSIVE),
        )
    }
    decided = out.time_s[(out.action >= 0) & (out.action != INCONCLUSIVE)] / 60.0
    null = not scenario.better(policy)
    return {
        "scenario": scenario.name,
        "null": null,
        **share,
        "false_promotion": share["promoted"] if null else None,
        "power": None if null or scenario.srm_loss else share["promoted"],
        "false_rollback": float(np.mean(false_rollback(scenario, policy, out))),
        "median_min": float(np.median(decided)) if len(decided) else None,
        "p90_min": float(np.percentile(decided, 90)) if len(decided) else None,
        "rollback_within_2": float(np.mean((out.action == ROLLBACK) & (out.evals <= 2))),
        "rollback_within_3": float(np.mean((out.action == ROLLBACK) & (out.evals <= 3))),
    }


def _fmt(x: float | None, pct: bool = True) -> str:
    if x is None:
        return "—"
    return f"{100 * x:.1f}%" if pct else f"{x:.0f}"


def table(policy: Policy, rows: list[dict]) -> str:
    """One policy's results as a markdown table with a summary underneath."""
    head = (
        "| scenario | promoted | rolled back | halted | inconclusive | false promotion | false rollback "
        "| median min | p90 min |\n|---|---|---|---|---|---|---|---|---|\n"
    )
    body = "".join(
        f"| {r['scenario']} | {_fmt(r['promoted'])} | {_fmt(r['rolled_back'])} | {_fmt(r['halted'])} "
        f"| {_fmt(r['inconclusive'])} | {_fmt(r['false_promotion'])} | {_fmt(r['false_rollback'])} "
        f"| {_fmt(r['median_min'], False)} | {_fmt(r['p90_min'], False)} |\n"
        for r in rows
    )
    by = {r["scenario"]: r for r in rows}
    worst = max(rows, key=lambda r: r["false_promotion"] or 0.0)
    lines = [
        f"- worst false-promotion rate over null scenarios: {_fmt(worst['false_promotion'])} ({worst['scenario']})",
        "- power: "
        + ", ".join(
            f"{r['scenario'].removeprefix('accuracy ')} {_fmt(r['power'])}"
            for r in rows
            if r["power"] is not None
        ),
    ]
    if "errors +5 pts" in by:
        r = by["errors +5 pts"]
        lines.append(
            f"- errors +5 pts rolled back within two evaluations: {_fmt(r['rollback_within_2'])} "
            f"(within three: {_fmt(r['rollback_within_3'])})"
        )
    if "errors +0.5 pt (at margin)" in by:
        r = by["errors +0.5 pt (at margin)"]
        bound = f" (the harm test's bound: {_fmt(policy.harm_alpha)})" if policy.name == "sequential" else ""
        lines.append(
            f"- errors +0.5 pt (at the margin, not harm): rolled back for errors {_fmt(r['false_rollback'])}{bound}"
        )
    for r in rows:
        if r["scenario"].startswith("SRM"):
            lines.append(f"- {r['scenario']}: halted {_fmt(r['halted'])}, promoted {_fmt(r['promoted'])}")
    return f"### policy: {policy.name}\n\n{head}{body}\n" + "\n".join(lines) + "\n"


def power_curve(results: dict[str, list[tuple[Scenario, dict]]], path: Path, margin: float) -> None:
    """P(promote) against the true accuracy lift, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pairs in results.items():
        pts = sorted(
            (s.lift * 100, r["promoted"])
            for s, r in pairs
            if s.error_diff == 0 and s.latency_ratio == 1 and s.srm_loss == 0
        )
        ax.plot(*zip(*pts, strict=True), marker="o", label=name)
    ax.axhline(0.8, color="grey", ls="--", lw=0.8, label="80% power")
    ax.axhline(0.05, color="red", ls=":", lw=0.8, label="5% false promotions")
    ax.axvline(margin * 100, color="black", ls=":", lw=0.8, label="margin")
    ax.set(xlabel="true accuracy lift (pts)", ylabel="P(promote)", ylim=(0, 1.02), title="Power curve")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Run every scenario under both policies; print and write the tables and the power curve."""
    p = argparse.ArgumentParser(prog="recsys simulate", description=__doc__.splitlines()[0])
    p.add_argument(
        "--reps", type=int, default=None, help="replications per scenario (default 1000, quick 200)"
    )
    p.add_argument("--out", default="sim-results", help="directory for simulation.md and power_curve.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="200 replications: a quick look, not the report")
    p.add_argument(
        "--through-aggregates",
        type=int,
        default=0,
        metavar="N",
        help="also run N replications a scenario through the production path: rows, aggregates, the "
        "worker's observation builder and decide() (control_plane/replay.py)",
    )
    argv = list(argv) if argv is not None else None
    if argv and argv[0] == "--":  # `recsys simulate -- --reps 10` passes the separator through
        argv = argv[1:]
    args = p.parse_args(argv)
    reps = args.reps or (200 if args.quick else 1000)
    if reps < 1:
        p.error("--reps must be positive")
    traffic, policies = Traffic(), (Policy(name="sequential"), Policy(name="threshold"))
    started = time.perf_counter()
    results: dict[str, list[tuple[Scenario, dict]]] = {}
    for policy in policies:
        results[policy.name] = [
            (s, summarize(s, policy, run_scenario(s, policy, traffic, reps, seed=args.seed * 1000 + i)))
            for i, s in enumerate(SCENARIOS)
        ]
    elapsed = time.perf_counter() - started
    tables = "\n".join(table(pol, [r for _, r in results[pol.name]]) for pol in policies)
    doc = (
        f"# Simulation: {reps} replications per scenario, both policies\n\n"
        f"Traffic: {traffic}\n\nPolicy defaults: {Policy().to_dict()}\n\n"
        "False promotion: promoted although the truth is not better than the margin or a guardrail is truly "
        "broken (shown for those null scenarios only). Power: promoted when the truth is better and traffic "
        "sound. False rollback: rolled back for a cause the truth does not support (errors/latency not truly "
        "beyond the margin, accuracy not truly worse / truly above the margin), or halted without a mismatch. "
        "Times: minutes to a promote/rollback/halt decision (inconclusive runs end at the time limit).\n\n"
        f"{tables}\nRun time: {elapsed:.0f} s\n"
    )
    # Users as the unit: the heavy-user A/A scenario, request-level beside user-level (simulate_users.py).
    from control_plane.analysis.simulate_users import HeavyUsers, heavy_user_table

    doc += "\n" + heavy_user_table(policies[0], HeavyUsers(), min(reps, 200), args.seed)
    if args.through_aggregates > 0:
        # replay.py builds on this module (Scenario, Traffic), so it is imported here, not at the top.
        from control_plane.replay import replay_table

        doc += "\n" + replay_table(SCENARIOS, policies[0], traffic, args.through_aggregates, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "simulation.md").write_text(doc)
    power_curve(results, out / "power_curve.png", policies[0].accuracy_margin)
    print(doc)
    print(f"wrote {out / 'simulation.md'} and {out / 'power_curve.png'}")
    return 0
