"""Specific errors, each naming the thing; the web layer maps them to HTTP in one place."""

from __future__ import annotations


class RecsysError(Exception):
    """Base of every error the service layer raises on purpose."""

    http_status = 400


class InvalidRequest(RecsysError):
    """The caller sent something malformed or out of range."""

    http_status = 400


class RolloutNotFound(RecsysError):
    http_status = 404

    def __init__(self, rollout_id: int):
        super().__init__(f"rollout {rollout_id} does not exist")
        self.rollout_id = rollout_id


class RolloutConflict(RecsysError):
    """The request contradicts the rollout's state (one already running, already ended, ...)."""

    http_status = 409


class ActionBusy(RolloutConflict):
    """Another action holds the action lock (control_plane/action_lock.py) for longer than the caller waits."""

    def __init__(self, holder: str, waited_s: float):
        super().__init__(
            f"another action is in progress ({holder}); waited {waited_s:g} s, try again when it has finished"
        )


class LabelConflict(RecsysError):
    """A label contradicts the one already stored for its request (a request's first label is its outcome)."""

    http_status = 409

    def __init__(self, request_ids: list[str]):
        super().__init__(
            f"{len(request_ids)} request(s) already have a different label, e.g. {request_ids[0][:80]!r}: "
            "a request's first label is its outcome; nothing of this batch was stored"
        )
        self.request_ids = request_ids


class DeployFailed(RecsysError):
    """A version could not be built or started, so it received no traffic."""

    http_status = 502


class NoPreviousBaseline(RecsysError):
    http_status = 409

    def __init__(self):
        super().__init__("no version holds the previous_baseline alias: nothing to restore")


class LabelsNotKept(RecsysError):
    """The database is unreachable and the label spill directory refused the labels (full disk, EIO):
    nothing was stored, and the client may send them again."""

    http_status = 503

    def __init__(self, why: str):
        super().__init__(f"labels not stored: the database is unreachable and {why}; send them again later")
