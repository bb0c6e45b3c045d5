"""Labels kept on disk while the database is unreachable, and replayed line by line once it answers.

Each process appends to its own `labels-<pid>.jsonl` (fsync'd, under `flock`). A replay claims a file
before it reads it: under the file's lock it renames it to `claimed-labels-*.jsonl` and keeps the lock
until the file is written and removed, so two gunicorn workers never replay (or remove) the same file,
and a writer that finds its file renamed starts a new one. A claim whose replayer died is unlocked and
picked up by the next replay.

A line that can never be written (torn by a crash, not a label, or refused by the database as bad data)
is moved to the dead-letter file `rejected-labels-<pid>.jsonl` and the rest of its file is replayed; the
database being unreachable stops the replay and keeps the claim for the next one. A replay runs on a
thread of its own at most once every `replay_interval_s`, so a request never waits for it and never
fails because of it.

Outcomes are counted through `on_rows(outcome, n)` (the control plane's /metrics):
`spilled`, `replayed`, `dead_letter`, `refused` (the disk took nothing: the client gets 503 and may
send again) and `lost` (a dead-letter line the disk did not take: logged, never silent).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import exc as sa_exc

from bentos.predlog import append_synced

log = logging.getLogger(__name__)

SPILL_PREFIX = "labels-"
CLAIM_PREFIX = "claimed-labels-"
DEAD_LETTER_PREFIX = "rejected-labels-"

LabelItem = tuple[str, int]
WriteLabels = Callable[[list[LabelItem], float], None]  # (items, ts): raises what SQLAlchemy raises


@dataclass(frozen=True)
class ReplayResult:
    replayed: int = 0  # labels written to the database
    dead_letter: int = 0  # lines moved to the dead-letter file
    lost: int = 0  # lines that could be neither written nor moved aside
    complete: bool = True  # False when the database stopped answering half-way


class SpillFull(OSError):
    """The spill directory refused the labels (ENOSPC, EIO)."""


def is_bad_data(exc: BaseException) -> bool:
    """True when writing the same label again cannot succeed: the data, not the database, is the problem."""
    if isinstance(exc, sa_exc.IntegrityError | sa_exc.DataError):
        return True
    if isinstance(exc, sa_exc.DBAPIError):
        return False  # unreachable, locked, a missing table: keep the label
    return isinstance(exc, sa_exc.StatementError | ValueError | TypeError)  # a NUL or a lone surrogate


class LabelSpill:
    """Append labels to this process's spill file; replay every process's files into the database."""

    def __init__(
        self,
        spill_dir: Path | str,
        write: WriteLabels,
        *,
        replay_interval_s: float = 5.0,
        on_rows: Callable[[str, int], None] | None = None,
        open_file: Callable[..., BinaryIO] = open,
    ) -> None:
        self.dir = Path(spill_dir)
        self.write = write
        self.replay_interval_s = replay_interval_s
        self._on_rows = on_rows
        self._open = open_file
        self._next_replay = 0.0
        self._replaying = threading.Lock()  # one replay thread per process at a time

    # ---- keeping ------------------------------------------------------------------------------

    def keep(self, items: list[LabelItem], ts: float) -> None:
        """Append `items` to this process's spill file, fsync'd; SpillFull when the disk took none of them."""
        data = b"".join(
            json.dumps({"request_id": rid, "label": label, "ts": ts}).encode() + b"\n" for rid, label in items
        )
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            with self._locked_own_file() as f:
                append_synced(f, data)
        except OSError as exc:
            self._count("refused", len(items))
            log.error("labels: %d labels neither stored nor spilled (%s): %s", len(items), self.dir, exc)
            raise SpillFull(
                exc.errno, f"the label spill directory is not writable: {exc.strerror or exc}"
            ) from exc
        self._count("spilled", len(items))
        self._next_replay = 0.0  # replay as soon as the database answers again

    @contextlib.contextmanager
    def _locked_own_file(self):
        path = self.dir / f"{SPILL_PREFIX}{os.getpid()}.jsonl"
        while True:
            f = self._open(path, "ab", buffering=0)
            try:
                fcntl.flock(f, fcntl.LOCK_EX)  # a replayer may hold it: then we find the file claimed
                if _same_file(f, path):
                    break
            except BaseException:
                f.close()
                raise
            f.close()  # claimed by a replayer while we waited: start a new file
        with f:
            yield f

    # ---- replaying ----------------------------------------------------------------------------

    def replay_soon(self) -> None:
        """Replay on a thread of its own if one is due (spill files waiting, interval passed) and none runs."""
        now = time.monotonic()
        if now < self._next_replay:
            return
        self._next_replay = now + self.replay_interval_s
        if not self.pending() or not self._replaying.acquire(blocking=False):
            return
        threading.Thread(target=self._replay_in_background, name="label-replay", daemon=True).start()

    def _replay_in_background(self) -> None:
        try:
            self._replay_files()
        except Exception:
            log.exception("labels: replay failed; it is tried again in %g s", self.replay_interval_s)
        finally:
            self._replaying.release()

    def replay(self) -> ReplayResult:
        """Replay every spill file of the directory now (waiting for a replay this process runs)."""
        with self._replaying:
            return self._replay_files()

    def pending(self) -> list[Path]:
        """Spill files and claims waiting for replay."""
        if not self.dir.is_dir():
            return []
        return sorted(self.dir.glob(f"{SPILL_PREFIX}*.jsonl")) + sorted(
            self.dir.glob(f"{CLAIM_PREFIX}*.jsonl")
        )

    def _replay_files(self) -> ReplayResult:
        total = ReplayResult()
        for path in self.pending():
            result = self._replay_file(path)
            total = ReplayResult(
                total.replayed + result.replayed,
                total.dead_letter + result.dead_letter,
                total.lost + result.lost,
                result.complete,
            )
            if not result.complete:
                break
        return total

    def _replay_file(self, path: Path) -> ReplayResult:
        try:
            f = open(path, "rb")  # noqa: SIM115 - held (and locked) until the claim is done
        except FileNotFoundError:
            return ReplayResult()
        with f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return ReplayResult()  # a writer appends to it, or another replayer has it
            if not _same_file(f, path):
                return ReplayResult()  # claimed or replayed by someone else while we opened it
            if path.name.startswith(SPILL_PREFIX):
                claimed = (
                    self.dir / f"{CLAIM_PREFIX}{path.stem[len(SPILL_PREFIX) :]}-{uuid.uuid4().hex[:12]}.jsonl"
                )
                os.rename(path, claimed)
                path = claimed
            good, bad = _parse(f.read())
            try:
                written, refused = self._write_all(good)
            except Exception as exc:  # the database is unavailable: keep the claim for the next replay
                log.warning("labels: replay of %s stopped, the database is unavailable: %s", path.name, exc)
                return ReplayResult(complete=False)
            bad += refused
            moved = self._dead_letter(bad)
            path.unlink()
        self._count("replayed", written)
        self._count("dead_letter", moved)
        self._count("lost", len(bad) - moved)
        if written or bad:
            log.info("labels: replayed %d labels from %s, %d set aside", written, path.name, len(bad))
        return ReplayResult(written, moved, len(bad) - moved)

    def _write_all(self, rows: list[dict]) -> tuple[int, list[tuple[str, str]]]:
        """Write `rows` a timestamp at a time, a label at a time where the database refuses a group;
        returns how many were written and the (line, reason) of those it refused as bad data."""
        written, refused = 0, []
        for ts in sorted({r["ts"] for r in rows}):
            group = [(r["request_id"], r["label"]) for r in rows if r["ts"] == ts]
            try:
                self.write(group, ts)
                written += len(group)
                continue
            except Exception as exc:
                if not is_bad_data(exc):
                    raise
            for item in group:
                try:
                    self.write([item], ts)
                    written += 1
                except Exception as exc:
                    if not is_bad_data(exc):
                        raise
                    line = json.dumps({"request_id": item[0], "label": item[1], "ts": ts})
                    refused.append((line, f"refused by the database: {str(exc)[:300]}"))
        return written, refused

    def _dead_letter(self, bad: list[tuple[str, str]]) -> int:
        """Append the (line, reason) pairs to this process's dead-letter file; how many it took."""
        if not bad:
            return 0
        data = b"".join(json.dumps({"line": line, "error": why}).encode() + b"\n" for line, why in bad)
        try:
            with self._open(self.dir / f"{DEAD_LETTER_PREFIX}{os.getpid()}.jsonl", "ab", buffering=0) as f:
                append_synced(f, data)
        except OSError as exc:
            log.error(
                "labels: %d unwritable lines lost, the dead-letter file is not writable: %s", len(bad), exc
            )
            return 0
        log.error("labels: %d lines no database can take moved to %s", len(bad), DEAD_LETTER_PREFIX)
        return len(bad)

    def _count(self, outcome: str, n: int) -> None:
        if n and self._on_rows is not None:
            self._on_rows(outcome, n)


def _parse(data: bytes) -> tuple[list[dict], list[tuple[str, str]]]:
    """The labels of a spill file, and the (line, reason) of each line that is not one."""
    good, bad = [], []
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        line = raw.decode(errors="replace")
        try:
            row = json.loads(raw)
            ok = (
                isinstance(row, dict)
                and isinstance(row.get("request_id"), str)
                and row.get("label") in (0, 1)
                and not isinstance(row.get("label"), bool)
                and isinstance(row.get("ts"), int | float)
                and math.isfinite(row["ts"])
            )
        except ValueError:
            ok = False
        if ok:
            good.append(row)
        else:
            bad.append((line, f"line {lineno} is not a label"))
    return good, bad


def _same_file(f: BinaryIO, path: Path) -> bool:
    try:
        return os.fstat(f.fileno()).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def dead_letter_lines(spill_dir: Path) -> int:
    """Lines in every dead-letter file under `spill_dir` (labels' and each Bento's): for `recsys status`."""
    if not spill_dir.is_dir():
        return 0
    n = 0
    for path in spill_dir.rglob("rejected-*.jsonl"):
        with contextlib.suppress(OSError), open(path, "rb") as f:
            n += sum(1 for line in f if line.strip())
    return n
