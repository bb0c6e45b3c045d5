"""POST /feedback: late labels from clients, routed here by the gateway.

Labels steer rollouts, so they need a credential of their own (the label-ingest token, not the
operator's) and may only name request ids a Bento issued (signed ids: control_plane/request_ids.py);
a request's first label is its outcome (control_plane/labels.py). A click on a /recommend answer names
the item and its position as served, and is checked against the logged served list (control_plane/
clicks.py). docs/labels.md says how to run it.
"""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify, request

from control_plane.bounds import load_json_body
from control_plane.clicks import parse_feedback, record_clicks
from control_plane.errors import InvalidRequest
from control_plane.labels import LabelSink
from control_plane.web.auth import bearer_ok
from control_plane.web.errors import Unauthorized
from control_plane.web.metrics import LABEL_ROWS_EXTENSION
from control_plane.web.wiring import current_ctx, wiring

bp = Blueprint("feedback", __name__)


def _sink() -> LabelSink:
    w = wiring()
    if getattr(w, "label_sink", None) is None:
        ctx = current_ctx()
        w.label_sink = LabelSink(
            ctx.engine, ctx.settings.spill_dir, on_rows=current_app.extensions.get(LABEL_ROWS_EXTENSION)
        )
    return w.label_sink


@bp.post("/feedback")
def feedback():
    w = wiring()
    if not bearer_ok(request, w.label_token):
        raise Unauthorized(
            "labels need Authorization: Bearer <label-ingest token> (RECSYS_LABEL_TOKEN or the state "
            "directory's label-token file; not the operator's token)"
        )
    body = load_json_body(request.get_data(cache=True))
    fb = parse_feedback(body)
    forged = [rid for rid in fb.request_ids if w.request_ids is None or not w.request_ids.issued(rid)]
    if forged:
        raise InvalidRequest(
            f"{len(forged)} request id(s) were not issued by this system (no valid signature), e.g. "
            f"{forged[0][:80]!r}: label only the X-Request-Id of an answer from /predict or /recommend"
        )
    answer: dict = {"accepted": len(fb)}
    if fb.clicks:  # checked against the served lists, so stored in the database or not at all (503)
        answer["clicks"] = len(fb.clicks)
        answer["new_clicks"] = record_clicks(current_ctx().engine, fb.clicks)
    outcome = _sink().record(fb.labels) if fb.labels else "stored"
    answer["stored"] = outcome
    return jsonify(answer), 200 if outcome == "stored" else 202
