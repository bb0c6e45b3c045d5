"""`recsys simulate`'s command line: runs the simulation (analysis/simulate.py), prints its report and
writes it with the power curve; `--through-aggregates` adds the row-by-row replay (replay.py).

The analysis returns typed results; every file and plot is made here.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from control_plane.analysis import simulate
from control_plane.analysis.simulate import (
    REPLAY_SCENARIOS,
    Report,
    Row,
    Scenario,
    power_points,
    run_all,
)
from control_plane.replay import replay_table


def power_curve(report: Report, path: Path) -> None:
    """P(promote) against the true accuracy lift (constant lift, 20 req/s, nothing else changed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    curves: dict[str, list[tuple[Scenario, Row]]] = {
        "sequential": report.sequential,
        "threshold": report.threshold,
    }
    for name, pairs in curves.items():
        pts = power_points(pairs)
        if len(pts) < 2:
            continue
        x = [s.lift * 100 for s, _ in pts]
        ax.plot(x, [r.promoted.share for _, r in pts], marker="o", label=name)
        ax.fill_between(x, [r.promoted.lo for _, r in pts], [r.promoted.hi for _, r in pts], alpha=0.2)
    ax.axhline(0.9, color="grey", ls="--", lw=0.8, label="90 % power")
    ax.axhline(0.05, color="red", ls=":", lw=0.8, label="5 % false promotions")
    ax.axvline(report.policy.accuracy_margin * 100, color="black", ls=":", lw=0.8, label="margin")
    ax.set(
        xlabel="true accuracy lift (pts)", ylabel="P(promote) within 6 h", ylim=(0, 1.02), title="Power curve"
    )
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Run every scenario under the sequential policy (and a few under the threshold rule); print and write
    the tables, the targets and the power curve."""
    p = argparse.ArgumentParser(
        prog="recsys simulate", description="replay both policies on synthetic streams with known truth"
    )
    p.add_argument(
        "--reps", type=int, default=None, help="replications per scenario (default 600, quick 150)"
    )
    p.add_argument("--out", default="sim-results", help="directory for simulation.md and power_curve.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="150 replications: a quick look, not the report")
    p.add_argument(
        "--jobs", type=int, default=min(2, os.cpu_count() or 1), help="scenarios run in parallel (default 2)"
    )
    p.add_argument(
        "--through-aggregates",
        type=int,
        default=0,
        metavar="N",
        help="also run N replications of a few scenarios through the production path: rows, aggregates, "
        "the worker's observation builder and decide() (control_plane/replay.py)",
    )
    argv = list(argv) if argv is not None else None
    if argv and argv[0] == "--":  # `recsys simulate -- --reps 10` passes the separator through
        argv = argv[1:]
    args = p.parse_args(argv)
    reps = args.reps or (150 if args.quick else 600)
    if reps < 1:
        p.error("--reps must be positive")

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    report = run_all(reps, args.seed, args.jobs, progress)
    doc = report.markdown
    if args.through_aggregates > 0:
        picked = [s for s in simulate.SCENARIOS if s.name in REPLAY_SCENARIOS]
        doc += "\n" + replay_table(picked, report.policy, report.traffic, args.through_aggregates, args.seed)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "simulation.md").write_text(doc)
    power_curve(report, out_dir / "power_curve.png")
    print(doc)
    print(f"wrote {out_dir / 'simulation.md'} and {out_dir / 'power_curve.png'}")
    print("all targets met" if report.met else "NOT all targets met")
    return 0
