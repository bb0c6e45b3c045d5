"""`recsys`: the command line; each command is a thin call into the service layer or the local stack.

Each command imports what it runs inside its function, and only that: importing the service layer
costs 5-8 s on this two-core machine (SciPy, SQLAlchemy, MLflow's client: measured with
`python -c 'import control_plane.services'` beside `import control_plane.stack.local`, 2.5-4.7 s, and
`control_plane.analysis.simulate`, Matplotlib, 7 s), which `recsys --help`, `status` or `down` need not pay.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import sys

from control_plane.analysis.policy_names import NAMES
from control_plane.errors import RecsysError
from control_plane.operator_actions import OperatorAction
from control_plane.settings import Settings, parse_weights


def _ctx(args):
    # lazy: the Context: 0.6 s of import (SciPy, SQLAlchemy), which `recsys --help` skips
    from control_plane.context import bootstrap

    return bootstrap(args.settings)


def _print(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def cmd_up(args) -> int:
    # lazy: the local stack: 0.8 s of import (SciPy, SQLAlchemy, rq), which `recsys --help` skips
    from control_plane.stack.local import up

    up(args.settings)
    return 0


def cmd_down(args) -> int:
    # lazy: the local stack: 0.8 s of import (SciPy, SQLAlchemy, rq), which `recsys --help` skips
    from control_plane.stack.local import down

    down(args.settings)
    return 0


def cmd_seed(args) -> int:
    # lazy: the compose seeding: 0.75 s of import (SciPy, SQLAlchemy, rq), which `recsys --help` skips
    from control_plane.stack.containers import seed

    seed(args.settings)
    return 0


def cmd_status(args) -> int:
    # lazy: the local stack: 0.8 s of import (SciPy, SQLAlchemy, rq), which `recsys --help` skips
    from control_plane.stack.local import print_urls, status

    settings = args.settings
    st = status(settings)
    if args.json:
        _print(st)
        return 0
    if not st["running"]:
        print("The local stack is not running (recsys up starts it).")
        return 1
    print(f"{'process':<16} {'state':<10} description")
    for name, p in st["processes"].items():
        print(f"{name:<16} {p['state']:<10} {p['description']}")
    print(f"\n{'role':<10} {'version':>7} {'weight':>6}  health   url")
    for v in st["versions"]:
        health = "ready" if v["healthy"] else ("-" if v["version"] is None else "DOWN")
        print(f"{v['role']:<10} {str(v['version'] or '-'):>7} {v['weight']:>6}  {health:<8} {v['url'] or ''}")
    logs = [v for v in st["versions"] if v.get("log")]
    if logs:
        print(f"\n{'prediction log':<14} {'lost':>6} {'set aside':>9} {'to replay':>9}  database disk")
        for v in logs:
            g = v["log"]
            aside = g.get("rows_rejected", 0) + g.get("rows_corrupt", 0)
            db = "up" if g.get("db_up", True) else "DOWN"
            disk = "ok" if g.get("disk_ok", True) else "FAILING"
            print(
                f"{'v' + str(v['version']):<14} {g.get('rows_lost', 0):>6} {aside:>9} {g.get('spill_rows', 0):>9}  {db:<8} {disk}"
            )
    print(f"dead-letter rows (rejected-*.jsonl under {settings.spill_dir}): {st.get('dead_letter_rows', 0)}")
    print()
    print_urls(settings)
    return 0


def cmd_train(args) -> int:
    # lazy: training: 66 ms of import (NumPy; CatBoost when it trains), which `recsys --help` skips
    from training.train import main

    argv = ["--profile", args.profile]
    if args.rows:
        argv += ["--rows", str(args.rows)]
    if args.iterations:
        argv += ["--iterations", str(args.iterations)]
    return main(argv, settings=args.settings)


def cmd_build(args) -> int:
    # lazy: the Bento build: 63 ms of import (PyYAML; BentoML when it builds), which `recsys --help` skips
    from bentos.build import build_bento

    s = args.settings
    print(
        build_bento(
            args.version,
            tracking_uri=s.mlflow_tracking_uri,
            model_name=s.registered_model_name,
            bentoml_home=s.bentoml_home,
        )
    )
    return 0


def cmd_deploy(args) -> int:
    # lazy: the service layer: 1.7 s of import (SciPy, SQLAlchemy), which `recsys --help` skips
    from control_plane import services

    _print(services.deploy_role(_ctx(args), args.version, args.role, actor="cli"))
    return 0


def cmd_canary(args) -> int:
    # lazy: the service layer: 1.7 s of import (SciPy, SQLAlchemy), which `recsys --help` skips
    from control_plane import services

    ctx = _ctx(args)
    if args.action == "start":
        if args.version is None:
            print("recsys canary start needs --version N", file=sys.stderr)
            return 2
        policy = json.loads(args.policy) if args.policy else {}
        if args.policy_name:
            policy["name"] = args.policy_name
        _print(services.start_canary(ctx, args.version, policy, actor="cli").to_dict())
        return 0
    rollout = ctx.ledger.active() if args.rollout is None else ctx.ledger.get(args.rollout)
    if args.action == "status":
        _print(
            {
                "rollout": rollout.to_dict() if rollout else None,
                "decisions": ctx.ledger.decisions(rollout.id, limit=5) if rollout else [],
            }
        )
        return 0
    if rollout is None:
        print("No rollout is running.", file=sys.stderr)
        return 1
    move = OperatorAction(args.action)
    if move.overrides and not (args.reason or "").strip():
        print(f"error: `canary {args.action}` overrides the analysis; give --reason", file=sys.stderr)
        return 2
    actor = f"cli:{getpass.getuser()}" if move.overrides else "cli"
    _print(services.operate(ctx, rollout.id, move, actor, args.reason if move.overrides else None).to_dict())
    return 0


def cmd_rollback(args) -> int:
    # lazy: the service layer: 1.7 s of import (SciPy, SQLAlchemy), which `recsys --help` skips
    from control_plane import services

    _print(services.restore_previous_baseline(_ctx(args), actor="cli"))
    return 0


def cmd_weights(args) -> int:
    # lazy: the service layer: 1.7 s of import (SciPy, SQLAlchemy), which `recsys --help` skips
    from control_plane import services

    ctx = _ctx(args)
    if args.set:
        _print(services.set_weights(ctx, parse_weights(args.set), actor="cli"))
    else:
        _print(services.traffic(ctx))
    return 0


def cmd_evaluate(args) -> int:
    # lazy: the service layer: 1.7 s of import (SciPy, SQLAlchemy), which `recsys --help` skips
    from control_plane import services

    _print(services.evaluate(_ctx(args), actor="cli"))
    return 0


def cmd_migrate(args) -> int:
    # lazy: the database engine: 0.27 s of import (SQLAlchemy), which `recsys --help` skips
    from control_plane.db.engine import migrate

    migrate(args.settings.database_url)
    return 0


def cmd_simulate(args) -> int:
    # lazy: the simulation: 1.5 s of import (SciPy, NumPy), which `recsys --help` skips
    from control_plane.simulate_cli import main

    return main(args.rest)


def cmd_demo(args) -> int:
    # lazy: the demo: 0.3 s of import (SciPy, NumPy), which `recsys --help` skips
    from load.demo import main

    return main(args.rest, settings=args.settings)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="recsys", description="Serve model versions side by side; canary them safely."
    )
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="start the local stack (trains and builds on first run)").set_defaults(
        fn=cmd_up
    )
    sub.add_parser("down", help="stop the local stack").set_defaults(fn=cmd_down)
    sub.add_parser(
        "seed", help="compose start-up step: train if empty, deploy and route every role's version"
    ).set_defaults(fn=cmd_seed)
    s = sub.add_parser("status", help="processes, versions, roles, weights, health")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_status)
    s = sub.add_parser("train", help="train a profile and register a new version")
    s.add_argument("--profile", default="baseline")
    s.add_argument("--rows", type=int)
    s.add_argument("--iterations", type=int)
    s.set_defaults(fn=cmd_train)
    s = sub.add_parser("build", help="build the Bento recsys:vN for registry version N")
    s.add_argument("--version", type=int, required=True)
    s.set_defaults(fn=cmd_build)
    s = sub.add_parser("deploy", help="build, start and route a version in a role")
    s.add_argument("--version", type=int, required=True)
    s.add_argument("--role", choices=["baseline", "canary", "control"], required=True)
    s.set_defaults(fn=cmd_deploy)
    s = sub.add_parser(
        "canary",
        help="start or steer a canary rollout",
        description="promote/rollback during a rollout override the analysis: they need --reason, and the "
        "ledger, the UI and /metrics mark them as overrides.",
    )
    s.add_argument("action", choices=["start", "status", *OperatorAction])
    s.add_argument("--version", type=int)
    s.add_argument("--rollout", type=int)
    s.add_argument("--reason", help="why an operator promotes or rolls back now (required for those two)")
    s.add_argument(
        "--policy-name",
        choices=NAMES,
        help="sequential (default: always-valid tests); threshold: the seed's point-estimate rule, UNSAFE "
        "under repeated looks (about 23 %% false promotions of an identical canary), for comparison only",
    )
    s.add_argument("--policy", help="policy parameters as JSON")
    s.set_defaults(fn=cmd_canary)
    sub.add_parser("rollback", help="restore the previous baseline in one step").set_defaults(fn=cmd_rollback)
    s = sub.add_parser("weights", help="show or set the role weights")
    s.add_argument("--set", help="e.g. baseline=85,canary=10,control=5")
    s.set_defaults(fn=cmd_weights)
    sub.add_parser("evaluate", help="evaluate the active rollout now").set_defaults(fn=cmd_evaluate)
    sub.add_parser("migrate", help="bring the database schema up to date").set_defaults(fn=cmd_migrate)
    for name, fn, help_ in (
        ("simulate", cmd_simulate, "replay both policies on synthetic streams"),
        ("demo", cmd_demo, "the whole story: a better canary promoted, a worse one rolled back"),
    ):
        s = sub.add_parser(name, help=help_, add_help=False)
        s.add_argument("rest", nargs=argparse.REMAINDER)
        s.set_defaults(fn=fn)
    return p


def main(argv: list[str] | None = None, settings: Settings | None = None) -> int:
    """Run one command with `settings` (read from the environment, once, unless given)."""
    settings = settings or Settings.from_env()
    logging.basicConfig(level=settings.log_level)
    args, extra = build_parser().parse_known_args(argv)
    args.settings = settings
    if extra and hasattr(args, "rest"):
        args.rest = [*extra, *args.rest]  # options meant for `recsys simulate` / `recsys demo` themselves
    elif extra:
        build_parser().error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.fn(args)
    except RecsysError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
