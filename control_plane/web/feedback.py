"""POST /feedback: late labels from clients, routed here by the gateway. Open like /predict, validated hard."""

from __future__ import annotations

import json

from flask import Blueprint, current_app, jsonify, request

from control_plane.errors import InvalidRequest
from control_plane.labels import LabelSink, parse_labels
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
    raw = request.get_data(cache=True)
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    items = parse_labels(body)
    outcome = _sink().record(items)
    status = 200 if outcome == "stored" else 202
    return jsonify({"accepted": len(items), "stored": outcome}), status


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")
