"""Rows the Bentos hold for the prediction log that the database does not have yet.

While the database is unreachable, each Bento spills its rows to files and replays them once it answers
again (bentos/predlog.py). For the seconds that replay takes, one arm's rows may be back while another's
are not, and a sample-ratio check on those counts sees a mismatch that is not there. The evaluation asks
the Bentos first, and decides nothing while any of them still has rows to replay
(control_plane/services.py: evaluate).

Each Bento answers `GET /predlog` with its log's state (bentos/http.py): `spill_rows` (rows it spilled
and has not replayed) and `spill_bytes` (the spill files waiting in its spill directory, whoever wrote
them); the same figures are on its /metrics, which costs the Bento milliseconds to build. A Bento that
does not answer is left out: a dead canary must not stop the evaluation that rolls it back, and its
spill files are replayed by the process that replaces it. So is a Bento that reports no writer alive
(`writer_alive`: its writer process keeps dying): nothing would replay its files, and waiting for them
would record no_data at every evaluation and stall the rollout.
"""

from __future__ import annotations

import json
import logging
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from bentos.http import LOG_STATE_PATH

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backlog:
    version: int
    rows: int
    bytes: int

    def __str__(self) -> str:
        return f"version {self.version}: {self.rows:,} rows, {self.bytes:,} bytes in spill files"


class LogBacklog(Protocol):
    def waiting(self, endpoints: Mapping[int, str]) -> list[Backlog]:
        """The Bentos among `endpoints` (version -> URL) that have rows still to replay."""
        ...


class HttpLogBacklog:
    """Asks each Bento's GET /predlog."""

    def __init__(self, timeout_s: float = 1.0):
        self.timeout_s = timeout_s

    def state(self, url: str) -> dict:
        """The Bento's GET /predlog: its log writer's counters and gauges (bentos/predlog.py: WriterStats)."""
        with urllib.request.urlopen(f"{url.rstrip('/')}{LOG_STATE_PATH}", timeout=self.timeout_s) as resp:
            state = json.loads(resp.read())
        if not isinstance(state, dict):
            raise ValueError("not a prediction log state")
        return state

    def waiting(self, endpoints: Mapping[int, str]) -> list[Backlog]:
        out = []
        for version, url in sorted(endpoints.items()):
            try:
                state = self.state(url)
                rows, size = int(state["spill_rows"]), int(state["spill_bytes"])
                if (
                    state.get("writer_alive") is False
                ):  # nothing replays its files: waiting would stall the rollout
                    log.warning(
                        "version %s has no prediction log writer; its %s spilled rows are not waited for",
                        version,
                        rows,
                    )
                    continue
            except (OSError, ValueError, KeyError, TypeError) as exc:  # unreachable, an error, not a Bento
                log.info("no log backlog read from version %s (%s)", version, exc.__class__.__name__)
                continue
            if rows or size:
                out.append(Backlog(version, rows, size))
        return out


class InMemoryLogBacklog:
    """A backlog set by hand (`rows[version] = n`), for tests and for running without Bentos."""

    def __init__(self) -> None:
        self.rows: dict[int, int] = {}

    def waiting(self, endpoints: Mapping[int, str]) -> list[Backlog]:
        return [Backlog(v, n, n * 200) for v, n in sorted(self.rows.items()) if v in endpoints and n]
