"""/predict at a steady rate from a few threads, for tests that break something while requests flow."""

from __future__ import annotations

import threading
import time
import uuid
from typing import NamedTuple

import httpx


class Answer(NamedTuple):
    t: float  # when the answer (or the failure) came
    status: int  # -1: no HTTP answer at all
    request_id: str
    version: str | None  # X-Model-Version of the answer


class Traffic:
    """Posts `features` to `url`/predict `rate_per_s` times a second until the block ends; keeps every answer."""

    def __init__(
        self,
        url: str,
        rate_per_s: float,
        features: list[float],
        threads: int = 4,
        headers: dict[str, str] | None = None,
        prefix: str = "traffic",
    ) -> None:
        self.url, self.period_s, self.threads = url, threads / rate_per_s, threads
        self.features, self.headers, self.prefix = features, headers or {}, prefix
        self.answers: list[Answer] = []
        self._stop = threading.Event()
        self._workers = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, i: int) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            due = time.monotonic() + i * self.period_s / self.threads
            while not self._stop.is_set():
                rid = f"{self.prefix}-{uuid.uuid4().hex}"
                # A server-to-server caller: no cookies kept, so the gateway's sticky cookie (for browsers
                # without a user id) does not pin a thread to one arm; each request takes the weighted split.
                client.cookies.clear()
                try:
                    r = client.post(
                        "/predict",
                        json={"features": self.features},
                        headers={"x-request-id": rid, **self.headers},
                    )
                    # the id the Bento issued (this one in front of it), when it answered
                    issued = r.headers.get("x-request-id", rid)
                    answer = Answer(time.time(), r.status_code, issued, r.headers.get("x-model-version"))
                except httpx.HTTPError:
                    answer = Answer(time.time(), -1, rid, None)
                self.answers.append(answer)
                due += self.period_s
                time.sleep(max(0.0, due - time.monotonic()))

    def failed(self, since: float = 0.0) -> list[Answer]:
        return [a for a in self.answers if a.status != 200 and a.t >= since]

    def __enter__(self) -> Traffic:
        for w in self._workers:
            w.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for w in self._workers:
            w.join(15)
