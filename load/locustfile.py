"""Locust users that ask for predictions through the gateway and, later, click by the ground truth.

Headless:  locust -f load/locustfile.py --headless -u 20 -r 10 -t 2m --host http://127.0.0.1:8080
Web UI:    locust -f load/locustfile.py --host http://127.0.0.1:8080   (then open http://127.0.0.1:8089)
Knobs (command line or LOCUST_* environment variables): --predict-weight, --recommend-weight,
--candidates, --label-share, --label-delay-min, --label-delay-max, --think-min, --think-max,
--label-token (default: RECSYS_LABEL_TOKEN, else the state directory's label-token file),
--user-pool, --anonymous-share, --clicks.

With `--clicks`, a /recommend answer is read as a person reads a list (the cascade model): position by
position from the top, each item clicked with its true click probability, until one is; that click
goes to /feedback with the item and its position as served (a ranking metric's input, docs/labels.md),
and a list read to the end without a click gets label 0. Without it, the answer is labelled by its top
item's truth, as a /predict answer is.

Every request names its user in `X-User-Id` (control_plane/users.py), so the gateway keeps each user on
one version: each request comes from one of `--user-pool` people (default 10,000, drawn uniformly, so
that a demo's few minutes of traffic hold enough users for a user-level test); `--heavy-users` draws
them Zipf-like instead (person k is 1/k as likely: a few people make many of the requests), and
`--user-pool 0` makes each Locust user one person. `--anonymous-share` of requests name no user.

A label names the request id the gateway's answer carried (X-Request-Id, issued and signed by the Bento),
not the id the user sent: /feedback refuses ids the system did not issue (docs/labels.md).
"""

from __future__ import annotations

import random
import uuid

import gevent
import numpy as np
from locust import FastHttpUser, events, task

from control_plane.credentials import ensure_label_token
from control_plane.settings import Settings
from training.data import click_probability, sample_features


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    parser.add_argument("--predict-weight", type=int, default=4, help="relative share of /predict calls")
    parser.add_argument("--recommend-weight", type=int, default=1, help="relative share of /recommend calls")
    parser.add_argument("--candidates", type=int, default=20, help="candidates per /recommend call")
    parser.add_argument(
        "--label-share", type=float, default=1.0, help="share of predictions that get a label"
    )
    parser.add_argument("--label-delay-min", type=float, default=0.5, help="seconds before a label, at least")
    parser.add_argument("--label-delay-max", type=float, default=3.0, help="seconds before a label, at most")
    parser.add_argument("--think-min", type=float, default=0.05, help="seconds a user waits between calls")
    parser.add_argument("--think-max", type=float, default=0.2)
    parser.add_argument(
        "--ok-log", default="", help="append the request id of every 2xx prediction to this file"
    )
    parser.add_argument(
        "--user-pool", type=int, default=10_000, help="people the requests come from (0: one per Locust user)"
    )
    parser.add_argument("--heavy-users", action="store_true", help="draw people Zipf-like, not uniformly")
    parser.add_argument(
        "--anonymous-share", type=float, default=0.0, help="share of requests without a user id"
    )
    parser.add_argument(
        "--clicks",
        action="store_true",
        help="click /recommend lists by the cascade model (item and position)",
    )
    parser.add_argument(
        "--label-token", default="", help="the label-ingest token (default: RECSYS_LABEL_TOKEN or its file)"
    )


class RecsysUser(FastHttpUser):
    """One simulated client: predictions now, labels drawn from the truth a little later."""

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.opts = opts
        self.label_headers = {
            "Authorization": f"Bearer {opts.label_token or ensure_label_token(Settings.from_env())}"
        }
        self.rng = np.random.default_rng(random.randrange(2**32))
        self.ok_log = open(opts.ok_log, "a", buffering=1) if opts.ok_log else None  # noqa: SIM115 (closed on stop)
        self.user_id = f"locust-{uuid.uuid4().hex[:8]}"
        if opts.user_pool > 0:
            weights = 1.0 / np.arange(1, opts.user_pool + 1) if opts.heavy_users else np.ones(opts.user_pool)
            self.user_cdf = np.cumsum(weights / weights.sum())
        self.tasks = [RecsysUser.predict] * max(0, opts.predict_weight) + [RecsysUser.recommend] * max(
            0, opts.recommend_weight
        )

    def on_stop(self) -> None:
        if self.ok_log:
            self.ok_log.close()

    def _served(self, rid: str) -> None:
        if self.ok_log:
            self.ok_log.write(rid + "\n")

    def _headers(self, rid: str) -> dict[str, str]:
        """X-Request-ID, and X-User-Id unless this request is one of the anonymous share."""
        headers = {"X-Request-ID": rid}
        if random.random() >= self.opts.anonymous_share:
            if self.opts.user_pool > 0:
                k = int(np.searchsorted(self.user_cdf, self.rng.random()))
                headers["X-User-Id"] = f"person-{k}"
            else:
                headers["X-User-Id"] = self.user_id
        return headers

    def wait_time(self) -> float:
        return random.uniform(self.opts.think_min, self.opts.think_max)

    @task
    def predict(self) -> None:
        x = sample_features(self.rng, 1)[0]
        rid = uuid.uuid4().hex
        with self.client.post(
            "/predict", json={"features": x.tolist()}, headers=self._headers(rid), catch_response=True
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"/predict answered {resp.status_code}: {resp.text[:200]}")
                return
            rid = resp.headers["X-Request-Id"]  # the id the Bento issued (the one sent is in front of it)
        self._served(rid)
        self._label_later(rid, x)

    @task
    def recommend(self) -> None:
        xs = sample_features(self.rng, self.opts.candidates)
        cands = [{"item_id": f"item-{i}", "features": row.tolist()} for i, row in enumerate(xs)]
        rid = uuid.uuid4().hex
        with self.client.post(
            "/recommend",
            json={"candidates": cands, "k": 5},
            headers=self._headers(rid),
            catch_response=True,
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"/recommend answered {resp.status_code}: {resp.text[:200]}")
                return
            served = [it["item_id"] for it in resp.json()["items"]]
            rid = resp.headers["X-Request-Id"]
        self._served(rid)
        if self.opts.clicks:
            self._click_later(rid, served, [xs[int(item.split("-")[1])] for item in served])
        else:
            self._label_later(rid, xs[int(served[0].split("-")[1])])

    def _click_later(self, rid: str, served: list[str], xs: list[np.ndarray]) -> None:
        """The cascade model: the list read from the top, each item clicked with its truth until one is."""
        if random.random() >= self.opts.label_share:
            return
        body: dict = {"request_id": rid, "label": 0}
        for position, (item, x) in enumerate(zip(served, xs, strict=True), 1):
            if self.rng.random() < float(click_probability(x)):
                body = {"request_id": rid, "item_id": item, "position": position}
                break
        delay = random.uniform(self.opts.label_delay_min, self.opts.label_delay_max)
        gevent.spawn_later(delay, self._post_feedback, body)

    def _label_later(self, rid: str, x: np.ndarray) -> None:
        if random.random() >= self.opts.label_share:
            return
        clicked = int(self.rng.random() < float(click_probability(x)))
        delay = random.uniform(self.opts.label_delay_min, self.opts.label_delay_max)
        gevent.spawn_later(delay, self._send_label, rid, clicked)

    def _send_label(self, rid: str, label: int) -> None:
        self._post_feedback({"request_id": rid, "label": label})

    def _post_feedback(self, body: dict) -> None:
        with self.client.post(
            "/feedback",
            json=body,
            headers=self.label_headers,
            name="/feedback",
            catch_response=True,
        ) as resp:
            if resp.status_code not in (200, 201, 202):
                resp.failure(f"/feedback answered {resp.status_code}: {resp.text[:200]}")
