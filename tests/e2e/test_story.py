"""The whole story on the real local stack: a better canary promoted, a worse one rolled back, nothing lost.

Runs after the other e2e files (it changes the baseline), with smaller numbers than `make demo`.
"""

from __future__ import annotations

import json
import time
import urllib.request

import pytest
import yaml
from sqlalchemy import select

from control_plane.db.engine import make_engine
from control_plane.db.schema import predictions
from control_plane.registry.mlflow_registry import MlflowRegistry

pytestmark = pytest.mark.e2e


def successes(prefix: str) -> int:
    """2xx answers Locust counted for /predict and /recommend, from the totals it writes at shutdown."""
    with open(f"{prefix}_final.json") as f:
        entries = [e for e in json.load(f) if e["name"] in ("/predict", "/recommend")]
    return sum(e["num_requests"] - e["num_failures"] for e in entries)


# Two rollouts, each with a shadow phase before its steps: on this shared two-core machine under a load
# average of 45 the demo took about 7 minutes and the test passed the default 600 s in its last reads.
@pytest.mark.timeout(1200)
def test_the_demo_promotes_the_better_canary_and_rolls_back_the_worse(stack, tmp_path):
    prefix = str(tmp_path / "locust")
    ok_log = tmp_path / "served.txt"
    run = stack.recsys(
        "demo",
        "--users",
        "16",
        "--interval",
        "2",
        "--step-seconds",
        "5",
        # The p99 guardrail has to be shown from the tail of a shared two-core machine: at the demo's
        # 1.5x the last step took 8 to 32 evaluations in four runs (this test 116-226 s alone, 370 s
        # in a full run); at 2x the flow is the same and a bound is still shown. The guardrail's own
        # tests are in tests/unit/test_decide.py.
        "--p99-ratio",
        "2.0",
        "--timeout",
        "300",
        "--csv",
        prefix,
        "--ok-log",
        str(ok_log),
        timeout=900,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "The story ended as expected." in run.stdout

    settings = stack.settings()
    registry = MlflowRegistry(settings.mlflow_tracking_uri, settings.registered_model_name)
    versions = {v.version: v for v in registry.versions()}
    promoted = [v for v in versions.values() if v.profile == "better" and "baseline" in v.aliases]
    assert promoted, "the better candidate ends as the baseline in MLflow"
    assert promoted[0].stage == "Production"
    worse = max(v.version for v in versions.values() if v.profile == "worse")
    assert versions[worse].stage == "Archived" and "canary" not in versions[worse].aliases

    doc = yaml.safe_load((settings.traefik_dynamic_dir / "recsys.yml").read_text())
    split = {e["name"]: e["weight"] for e in doc["http"]["services"]["recsys-split"]["weighted"]["services"]}
    assert split.get(f"recsys-v{promoted[0].version}") == 95
    assert f"recsys-v{worse}" not in split

    with urllib.request.urlopen(f"{stack.control_plane}/api/decisions?limit=500") as resp:
        ledger = json.loads(resp.read())["decisions"]
    with urllib.request.urlopen(f"{stack.control_plane}/api/rollouts") as resp:
        rollouts = json.loads(resp.read())["rollouts"]
    ended = {r["candidate_version"]: r for r in rollouts}
    assert ended[promoted[0].version]["phase"] == "promoted"
    assert ended[worse]["phase"] == "rolled_back"
    for r in (ended[promoted[0].version], ended[worse]):
        final = [d for d in ledger if d["rollout_id"] == r["id"] and d["action"] in ("promote", "rollback")]
        assert final, f"rollout {r['id']} has its decision in the ledger"
        assert final[0]["metrics"]["canary"]["labelled"] > 0 and final[0]["rules"] and final[0]["stats"]
        # Each began with a shadow phase at weight 0 that the candidate passed (neither errors nor slows).
        shadow = [d for d in ledger if d["rollout_id"] == r["id"] and d["phase_before"] == "shadow"]
        passed = [d for d in shadow if d["action"] == "advance"]
        assert len(passed) == 1 and passed[0]["phase_after"] == "progressing", [d["reason"] for d in shadow]
        assert all(d["canary_weight"] == 0 for d in shadow if d is not passed[0])
        assert passed[0]["stats"]["shadow"]["requests"]["shadow"] > 0

    served = ok_log.read_text().split()
    assert len(served) > 1000 and len(served) <= successes(prefix)  # an id is written after its count
    engine = make_engine(settings.database_url)
    deadline = time.monotonic() + 60
    while True:
        found = set()
        with engine.connect() as conn:
            for i in range(0, len(served), 500):
                found.update(
                    conn.execute(
                        select(predictions.c.request_id).where(
                            predictions.c.request_id.in_(served[i : i + 500])
                        )
                    ).scalars()
                )
        if len(found) == len(set(served)) or time.monotonic() > deadline:
            break
        time.sleep(1)
    engine.dispose()
    assert len(set(served)) == len(served), "request ids are unique"
    missing = set(served) - found
    assert not missing, f"{len(missing)} of {len(served)} served predictions have no row"
