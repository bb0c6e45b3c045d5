"""`make demo`: a better canary promoted, a worse one rolled back, on the real local stack, narrated."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from control_plane.analysis.policy import Policy
from control_plane.analysis.types import Phase
from control_plane.settings import Settings
from load.locust_process import start_locust
from training.train import train_and_register


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def start_load(
    settings: Settings, users: int, log_path: Path, csv: str | None = None, ok_log: str | None = None
) -> subprocess.Popen:
    """Locust through the gateway, labels drawn from the ground truth, short think times."""
    return start_locust(
        settings,
        users,
        log_path,
        *(
            "--label-delay-min",
            "0.2",
            "--label-delay-max",
            "1.5",
            "--think-min",
            "0.01",
            "--think-max",
            "0.05",
        ),
        # Locust rewrites the CSV once a second and not at shutdown; the JSON is written at shutdown.
        *(["--csv", csv, "--json-file", f"{csv}_final"] if csv else []),
        *(["--ok-log", ok_log] if ok_log else []),
    )


def describe(ctx, rollout_id: int) -> str:
    r = ctx.ledger.get(rollout_id)
    weights = ctx.traffic_store.load().weights
    last = ctx.ledger.decisions(rollout_id, limit=1)
    sizes = last[0]["sample_sizes"] if last else {}
    n = " ".join(f"{role}:{s.get('requests', 0)}/{s.get('labelled', 0)}" for role, s in sizes.items())
    w = " ".join(f"{role}={wt}" for role, wt in sorted(weights.items()))
    reason = last[0]["reason"] if last else "-"
    return f"[{r.phase:<12}] weights {w} | requests/labelled {n or '-'} | {reason}"


def run_story(ctx, version: int, expect: Phase, policy: dict, timeout_s: float) -> tuple[bool, int]:
    # lazy: the service layer: 1.4 s of import (SciPy, SQLAlchemy), which `recsys demo --help` skips
    from control_plane import services

    rollout = services.start_canary(ctx, version, policy, actor="demo")
    _say(f"Started rollout {rollout.id}: version {version} as canary, expecting it to end {expect}.")
    deadline = time.monotonic() + timeout_s
    last_line = ""
    while time.monotonic() < deadline:
        line = describe(ctx, rollout.id)
        if line != last_line:
            _say("  " + line)
            last_line = line
        current = ctx.ledger.get(rollout.id)
        # Terminal once recorded; done once its action (drain, undeploy, MLflow stage) has been applied too.
        if current.phase.terminal and current.pending_action is None:
            return current.phase is expect, rollout.id
        time.sleep(2)
    _say(f"  timed out after {timeout_s:.0f} s")
    return False, rollout.id


def ensure_stack(settings: Settings) -> Settings:
    """The stack up; the settings to use with it (a fresh `recsys up` creates the Redis password)."""
    # lazy: the local stack: 0.65 s of import (SQLAlchemy, rq), which `recsys demo --help` skips
    from control_plane.stack.local import gateway_answers, up

    if gateway_answers(settings):
        return settings
    _say("The local stack is not up: starting it (recsys up).")
    return up(settings)


def main(argv: list[str] | None = None, settings: Settings | None = None) -> int:
    p = argparse.ArgumentParser(prog="recsys demo")
    p.add_argument("--users", type=int, default=30)
    p.add_argument("--timeout", type=float, default=420, help="seconds allowed for each story")
    p.add_argument("--interval", type=int, default=3, help="seconds between evaluations during the demo")
    p.add_argument(
        "--csv",
        help="write Locust's request statistics to CSV files with this prefix (final totals: PREFIX_final.json)",
    )
    p.add_argument("--ok-log", help="write the request id of every 2xx prediction to this file")
    p.add_argument("--step-seconds", type=float, default=20, help="minimum seconds at each canary step")
    p.add_argument(
        "--p99-ratio",
        type=float,
        default=1.5,
        help="latency guardrail for the demo (the better model has more trees: slower by ~10%% at p99)",
    )
    p.add_argument(
        "--shadow-percent",
        type=int,
        default=50,
        help="each rollout begins with a shadow phase: this share of requests mirrored to the candidate (0: none)",
    )
    p.add_argument("--shadow-seconds", type=float, default=20, help="minimum seconds of the shadow phase")
    args = p.parse_args(argv)

    # lazy: the Context and the jobs: 0.5 s of import (SQLAlchemy, rq), which `recsys demo --help` skips
    from control_plane.context import bootstrap
    from control_plane.jobs import schedule_evaluations

    settings = ensure_stack(settings or Settings.from_env())
    ctx = bootstrap(settings)
    schedule_evaluations(settings.effective_redis_url, args.interval)
    policy = Policy.fast(
        step_min_duration_s=args.step_seconds,
        p99_ratio=args.p99_ratio,
        shadow_percent=args.shadow_percent,
        shadow_min_duration_s=args.shadow_seconds,
    ).to_dict()
    shadow = (
        f"a shadow phase first ({args.shadow_percent}% of requests mirrored to the candidate, answers "
        f"discarded, at least {args.shadow_seconds:.0f} s), then "
        if args.shadow_percent
        else ""
    )
    _say(
        f"Policy: sequential, {shadow}steps {policy['steps']}, at least {args.step_seconds:.0f} s a step, "
        f"accuracy margin {policy['accuracy_margin'] * 100:.0f} pt, p99 ≤ {args.p99_ratio}× baseline, "
        f"errors ≤ +{policy['error_margin'] * 100:.1f} pt; evaluations every {args.interval} s."
    )
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    load = start_load(settings, args.users, settings.log_dir / "demo-locust.log", args.csv, args.ok_log)
    ok = True
    try:
        active = ctx.ledger.active()
        if active is not None:
            services_rollback(ctx, active.id)
        better = _version_with_profile(ctx, "better") or train_and_register(
            tracking_uri=settings.mlflow_tracking_uri,
            artifact_location=settings.training_artifact_location,
            model_name=settings.registered_model_name,
            profile="better",
            progress=False,
        )
        _say(f"\n1) The better candidate (version {better}) as a canary.")
        good, r1 = run_story(ctx, better, Phase.PROMOTED, policy, args.timeout)
        ok &= good
        active = ctx.ledger.active()
        if active is not None:  # the story timed out: end its rollout, or the next could not start
            services_rollback(ctx, active.id)
        _say("\n2) Training a worse candidate and trying it as a canary.")
        worse = train_and_register(
            tracking_uri=settings.mlflow_tracking_uri,
            artifact_location=settings.training_artifact_location,
            model_name=settings.registered_model_name,
            profile="worse",
            progress=False,
        )
        bad, r2 = run_story(ctx, worse, Phase.ROLLED_BACK, policy, args.timeout)
        ok &= bad
    finally:
        load.terminate()
        load.wait(30)
        schedule_evaluations(settings.effective_redis_url, settings.eval_interval_s)
    _say("\nSummary")
    for rid in (r1, r2):
        r = ctx.ledger.get(rid)
        _say(f"  rollout {rid}: version {r.candidate_version} {r.phase} — {r.reason}")
    _say(f"  baseline is now version {ctx.registry.version_for('baseline')} in MLflow")
    _say(
        f"\nLook at: control plane http://127.0.0.1:{settings.control_plane_port}/ , "
        f"MLflow http://127.0.0.1:{settings.mlflow_port}/ , Grafana (compose) http://127.0.0.1:3000/"
    )
    _say("The story ended as expected." if ok else "The story did NOT end as expected.")
    return 0 if ok else 1


def services_rollback(ctx, rollout_id: int) -> None:
    # lazy: the service layer: 1.4 s of import (SciPy, SQLAlchemy), which `recsys demo --help` skips
    from control_plane import services

    _say(f"Rollout {rollout_id} was still running: rolling it back first.")
    services.rollback_now(ctx, rollout_id, actor="demo", reason="the demo ends its rollout")


def _version_with_profile(ctx, profile: str) -> int | None:
    """The newest version of `profile` that is not already the baseline and never failed a rollout."""
    baseline = ctx.registry.version_for("baseline")
    ended = {r.candidate_version for r in ctx.ledger.list() if r.phase.terminal}
    for info in sorted(ctx.registry.versions(), key=lambda i: -i.version):
        if info.profile == profile and info.version != baseline and info.version not in ended:
            return info.version
    return None


if __name__ == "__main__":
    sys.exit(main())
