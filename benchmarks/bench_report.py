"""The tables, targets and plot of `make bench` (benchmarks/bench.py), from its samples."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

PEERS = ("peer-1w", "peer-2w")
N_CANDIDATES = 100


def summarize(samples: list[dict]) -> dict[tuple[str, str], dict]:
    """(workload, setup) -> medians over the repeats, plus totals."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for s in samples:
        groups.setdefault((s["workload"], s["setup"]), []).append(s)
    out = {}
    for key, runs in groups.items():
        med = statistics.median
        requests = sum(r["requests"] for r in runs)
        row = {
            "runs": len(runs),
            "rps": med(r["rps"] for r in runs),
            "p50_ms": med(r["p50_ms"] for r in runs),
            "p99_ms": med(r["p99_ms"] for r in runs),
            "cpu_us_per_req": med(r["cpu_s"] / max(r["requests"], 1) * 1e6 for r in runs),
            "errors": sum(r["errors"] for r in runs),
            "requests": requests,
        }
        if runs[0]["rows"] is not None:
            row["ok"] = sum(r["ok"] for r in runs)
            row["server_ok"] = sum(r["server_ok"] for r in runs)
            row["rows"] = sum(r["rows"] for r in runs)
            # Every 2xx is in the table: as many rows as responses the Bentos sent, at least as many as wrk saw.
            row["all_logged"] = all(r["rows"] == r["server_ok"] and r["rows"] >= r["ok"] for r in runs)
        if runs[0].get("proxy_cpu_s") is not None:
            row["proxy_cpu_us_per_req"] = med(r["proxy_cpu_s"] / max(r["requests"], 1) * 1e6 for r in runs)
        if runs[0]["db_cpu_s"] is not None:
            row["db_cpu_us_per_req"] = med(r["db_cpu_s"] / max(r["requests"], 1) * 1e6 for r in runs)
        if runs[0].get("wait_s") is not None:
            row["wait_us_per_req"] = med(r["wait_s"] / max(r["requests"], 1) * 1e6 for r in runs)
        out[key] = row
    return out


def best_peer(summary: dict, workload: str) -> str | None:
    """The faster peer on this workload, or None when no peer was driven (`--setups`)."""
    peers = [p for p in PEERS if (workload, p) in summary]
    return max(peers, key=lambda p: summary[(workload, p)]["rps"]) if peers else None


def _one_worker(summary: dict, workload: str, row: dict, key: str) -> str:
    """The same ratio against the one-worker peer (the seed's design: one process), when it is not the best."""
    peer = summary.get((workload, "peer-1w"))
    if not peer or best_peer(summary, workload) == "peer-1w":
        return ""
    return f"; against peer-1w ×{row[key] / peer[key]:.2f}"


LOG_COST_WORKLOADS = ("predict c8", "log pair c8")


def log_pairs(samples: list[dict]) -> list[tuple[dict, dict]]:
    """(log on, log off) runs of the gateway at /predict c8, paired in the order they ran.

    The i-th run of each setup in a workload belongs to the same repeat, so each pair ran minutes
    apart at most ("log pair c8": back to back), and a pair's ratio is free of the drift between
    repeats that medians taken over each setup apart are not.
    """
    pairs = []
    for w in LOG_COST_WORKLOADS:
        on = [s for s in samples if s["workload"] == w and s["setup"] == "gateway"]
        off = [s for s in samples if s["workload"] == w and s["setup"] == "gateway-nolog"]
        pairs += list(zip(on, off, strict=False))  # none when `--setups` left the gateway out
    return pairs


def log_cost(samples: list[dict]) -> dict | None:
    """The log's cost in throughput over the pairs (median, range), and its own share of the CPU."""
    pairs = log_pairs(samples)
    if not pairs:
        return None
    costs = sorted(1 - on["rps"] / off["rps"] for on, off in pairs)
    shares = [
        (s["log_cpu_s"] + (s["db_cpu_s"] or 0.0)) / (s["cpu_s"] + (s["db_cpu_s"] or 0.0))
        for s, _ in pairs
        if s.get("log_cpu_s") is not None and s["cpu_s"] > 0
    ]
    waits = [
        (on["wait_s"] / max(on["requests"], 1) * 1e6, off["wait_s"] / max(off["requests"], 1) * 1e6)
        for on, off in pairs
        if on.get("wait_s") is not None and off.get("wait_s") is not None
    ]
    return {
        "pairs": len(costs),
        "median": statistics.median(costs),
        "low": costs[0],
        "high": costs[-1],
        "cpu_share": statistics.median(shares) if shares else None,
        # the gateway's threads waiting for a core, a request, with the log and without
        "wait_us": tuple(statistics.median(w[i] for w in waits) for i in (0, 1)) if waits else None,
    }


def targets(summary: dict, meta: dict, samples: list[dict]) -> list[tuple[str, bool | None, str]]:
    """(target, met?, the numbers) for each target of the issue."""

    def get(w: str, s: str) -> dict | None:
        return summary.get((w, s))

    out: list[tuple[str, bool | None, str]] = []
    g8, w8 = get("predict c8", "gateway"), "predict c8"
    if g8 and best_peer(summary, w8):
        p = get(w8, best_peer(summary, w8))
        name = best_peer(summary, w8)
        out.append(
            (
                f"gateway, log on, /predict c8: req/s ≥ the peer's ({name})",
                g8["rps"] >= p["rps"],
                f"{g8['rps']:.0f} vs {p['rps']:.0f} req/s (×{g8['rps'] / p['rps']:.2f})"
                + _one_worker(summary, w8, g8, "rps"),
            )
        )
        out.append(
            (
                f"gateway, log on, /predict c8: p99 ≤ 1.5 × the peer's ({name})",
                g8["p99_ms"] <= 1.5 * p["p99_ms"],
                f"{g8['p99_ms']:.2f} vs {p['p99_ms']:.2f} ms (×{g8['p99_ms'] / p['p99_ms']:.2f})"
                + _one_worker(summary, w8, g8, "p99_ms"),
            )
        )
    g1 = get("predict c1", "gateway")
    if g1:
        out.append(
            ("gateway, /predict at one connection: p99 < 5 ms", g1["p99_ms"] < 5, f"{g1['p99_ms']:.2f} ms")
        )
    wr = "recommend100 c8"
    gr = get(wr, "gateway")
    if gr and best_peer(summary, wr):
        p = get(wr, best_peer(summary, wr))
        g_items, p_items = gr["rps"] * N_CANDIDATES, p["rps"] * N_CANDIDATES
        out.append(
            (
                f"gateway /recommend (100 candidates) c8: scored candidates/s ≥ the peer's ({best_peer(summary, wr)})",
                g_items >= p_items,
                f"{g_items:,.0f} vs {p_items:,.0f} /s",
            )
        )
        out.append(
            ("gateway /recommend c8: ≥ 50,000 scored candidates/s", g_items >= 50_000, f"{g_items:,.0f} /s")
        )
    logged = [(k, v) for k, v in summary.items() if "all_logged" in v]
    if logged:
        rows = sum(v["rows"] for _, v in logged)
        ok = sum(v["ok"] for _, v in logged)
        srv = sum(v["server_ok"] for _, v in logged)
        out.append(
            (
                "every 2xx of a run is in the database afterwards",
                all(v["all_logged"] for _, v in logged),
                f"{rows:,} rows for {srv:,} 2xx sent by the Bentos ({ok:,} seen by wrk)",
            )
        )
    off, cost = get("predict c8", "gateway-nolog"), log_cost(samples)
    if cost:
        numbers = [
            f"median of {cost['pairs']} pairs of runs, log on and off: {cost['median']:+.1%}"
            f" (from {cost['low']:+.1%} to {cost['high']:+.1%})"
        ]
        if g8 and off:
            numbers.append(f"medians of the c8 runs {g8['rps']:.0f} on vs {off['rps']:.0f} off req/s")
        if cost["cpu_share"] is not None:
            numbers.append(f"the writers' and Postgres' CPU: {cost['cpu_share']:.1%} of the gateway's")
        if cost["wait_us"] is not None:
            with_log, without = cost["wait_us"]
            numbers.append(
                f"the gateway's threads waited for a core {with_log:.0f} µs a request with the log, {without:.0f} without"
            )
        out.append(
            (
                "prediction log costs ≤ 10% of throughput (gateway, /predict c8)",
                cost["median"] <= 0.10,
                "; ".join(numbers),
            )
        )
    out.append(
        (
            "benchmark completes in < 10 minutes",
            meta["elapsed_s"] < 600,
            f"{meta['elapsed_s']:.0f} s (training and building {meta['prepare_s']:.0f} s, all up at {meta['startup_s']:.0f} s)",
        )
    )
    return out


def markdown(
    summary: dict, mem: dict, bento_mem: dict, meta: dict, judged: list[tuple[str, bool | None, str]]
) -> str:
    lines = [
        "# Serving benchmark",
        "",
        f"Medians of {meta['repeats']} wrk runs of {meta['duration_s']:g} s per cell (wrk: one thread, on the same "
        f"{meta['cores']} cores as the servers); setups alternated run by run. Prediction log: {meta['database']}. "
        + (
            f"Each repeat ends with one more pair of runs of {meta['log_pair_duration_s']:g} s, the gateway with "
            "the log and without it back to back (log pair c8). "
            if meta.get("log_pair_duration_s")
            else ""
        )
        + f"Load average at the end: {meta['load_average_end'][0]:.1f}. Total time {meta['elapsed_s']:.0f} s. "
        "What the columns mean and which settings these numbers led to: docs/performance.md.",
        "",
        "| workload | setup | req/s | p50 ms | p99 ms | ×peer-1w req/s | ×peer-2w req/s | ×peer-1w p99 "
        "| ×peer-2w p99 | CPU µs/req | of which Traefik | DB CPU µs/req | core wait µs/req | errors | rows / 2xx |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for (w, s), r in summary.items():
        ratios = []
        for key in ("rps", "p99_ms"):
            for peer in PEERS:
                p = summary.get((w, peer))
                ratios.append(f"{r[key] / p[key]:.2f}" if p and not s.startswith("peer") else "")
        db_cpu = f"{r['db_cpu_us_per_req']:.0f}" if "db_cpu_us_per_req" in r else ""
        proxy = f"{r['proxy_cpu_us_per_req']:.0f}" if "proxy_cpu_us_per_req" in r else ""
        wait = f"{r['wait_us_per_req']:.0f}" if "wait_us_per_req" in r else ""
        logged = f"{r['rows']:,} / {r['ok']:,}" if "rows" in r else ""
        lines.append(
            f"| {w} | {s} | {r['rps']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {' | '.join(ratios)} "
            f"| {r['cpu_us_per_req']:.0f} | {proxy} | {db_cpu} | {wait} | {r['errors']} | {logged} |"
        )
    rec = [(s, r) for (w, s), r in summary.items() if w.startswith("recommend")]
    if rec:
        lines += ["", "Scored candidates/s on /recommend (100 candidates a request): "
                  + ", ".join(f"{s} {r['rps'] * N_CANDIDATES:,.0f}" for s, r in rec) + "."]  # fmt: skip
    lines += ["", "## Targets", "", "| target | met | numbers |", "|---|---|---|"]
    for name, ok, numbers in judged:
        lines.append(f"| {name} | {'yes' if ok else 'no'} | {numbers} |")
    lines += [
        "",
        "## Memory (after the runs)",
        "",
        "| setup | processes | RSS MB | USS MB |",
        "|---|--:|--:|--:|",
    ]
    for name, rows in mem.items():
        lines.append(
            f"| {name} | {len(rows)} | {sum(r['rss_mb'] for r in rows):.0f} | {sum(r['uss_mb'] for r in rows):.0f} |"
        )
    lines += ["", "Per process (RSS / USS MB):", ""]
    for name, rows in mem.items():
        lines.append(
            f"- {name}: " + "; ".join(f"`{r['cmd'][:60]}` {r['rss_mb']:.0f}/{r['uss_mb']:.0f}" for r in rows)
        )
    for name, serves in bento_mem.items():
        totals = ", ".join(f"{sum(r['rss_mb'] for r in rows):.0f}" for rows in serves)
        lines.append(f"- {name}: RSS per `bentoml serve` (arbiter + workers): {totals} MB")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharex=True)
    setups = sorted({s for (w, s) in summary if w.startswith("predict")})
    for s in setups:
        points = sorted(
            (
                (int(w.split("c")[-1]), summary[(w, s)])
                for (w, s2) in summary
                if s2 == s and w.startswith("predict")
            ),
            key=lambda p: p[0],
        )
        for ax, key in zip(axes, ("p50_ms", "p99_ms"), strict=True):
            xs, ys = [r["rps"] for _, r in points], [r[key] for _, r in points]
            ax.plot(xs, ys, marker="o", label=s)
            for (c, _), x, y in zip(points, xs, ys, strict=True):
                ax.annotate(f"c{c}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    for ax, title in zip(axes, ("p50", "p99"), strict=True):
        ax.set_yscale("log")
        ax.set_xlabel("requests/s (/predict)")
        ax.set_ylabel(f"{title} latency, ms")
        ax.set_title(f"/predict {title} vs throughput (1, 8, 32 connections)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, samples: list[dict], mem: dict, bento_mem: dict, meta: dict) -> str:
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(samples)
    judged = targets(summary, meta, samples)  # once: the log's cost reads every sample
    md = markdown(summary, mem, bento_mem, meta, judged)
    (out / "bench.md").write_text(md)
    (out / "bench.json").write_text(
        json.dumps(
            {
                "meta": meta,
                "summary": [{"workload": w, "setup": s, **r} for (w, s), r in summary.items()],
                "targets": [{"target": t, "met": ok, "numbers": n} for t, ok, n in judged],
                "memory": mem,
                "samples": samples,
            },
            indent=1,
        )
    )
    plot(summary, out / "bench.png")
    return md
