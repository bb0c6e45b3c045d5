"""POST /feedback: late labels from clients, routed here by the gateway. Open like /predict, validated hard."""

from __future__ import annotations

from flask import Blueprint, jsonify, request

from control_plane.bounds import load_json_body
from control_plane.labels import LabelSink, parse_labels
from control_plane.web.wiring import current_ctx, wiring

bp = Blueprint("feedback", __name__)


def _sink() -> LabelSink:
    w = wiring()
    if getattr(w, "label_sink", None) is None:
        ctx = current_ctx()
        w.label_sink = LabelSink(ctx.engine, ctx.settings.spill_dir)
    return w.label_sink


@bp.post("/feedback")
def feedback():
    body = load_json_body(request.get_data(cache=True))
    items = parse_labels(body)
    outcome = _sink().record(items)
    status = 200 if outcome == "stored" else 202
    return jsonify({"accepted": len(items), "stored": outcome}), status
