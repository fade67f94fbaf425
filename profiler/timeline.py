"""Memory timelines: a PNG (matplotlib) and a self-contained HTML page (inline SVG + data).

The picture: bytes alive over one training step, stacked by category (parameters,
gradients, optimizer states, inputs, activations, temporaries), with the phase boundaries
(forward / backward / optimizer) — activations rise layer by layer in forward, the
cross-entropy spike sits at the loss, backward releases them layer by layer — and the
planner's prediction overlaid as one segment per phase (its per-phase peak allocated) plus
the measured allocator peaks on CUDA.

The HTML references nothing outside itself (no CDN, no web fonts): the chart is inline
SVG, the data is embedded as JSON, and a few lines of inline script show the values under
the cursor. It opens offline.
"""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

__all__ = ["write_timeline", "write_png", "write_html", "decimate", "COLORS", "ORDER"]

ORDER = ("parameter", "buffer", "optimizer", "gradient", "input", "activation", "temp")
"""Stacking order, bottom to top: what lives all step long first."""
COLORS = {"parameter": "#4C72B0", "buffer": "#8172B3", "optimizer": "#55A868", "gradient": "#DD8452",
          "input": "#937860", "activation": "#C44E52", "temp": "#DA8BC3"}
LABELS = {"parameter": "parameters", "buffer": "buffers", "optimizer": "optimizer states", "gradient": "gradients",
          "input": "inputs", "activation": "activations", "temp": "temporaries (backward / step scratch)"}
PHASE_FILL = {"forward": "#e8f0fa", "backward": "#fbeee6", "optimizer": "#eaf5ea"}
MAX_POINTS = 2500


def _unit(nbytes: float) -> tuple[float, str]:
    for div, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if nbytes >= 2 * div:
            return float(div), name
    return 1.0, "B"


def decimate(points: list[list], n_cats: int, limit: int = MAX_POINTS) -> list[list]:
    """At most `limit` points; each bucket keeps its highest-total point (peaks survive)."""
    if len(points) <= limit:
        return points
    step = len(points) / limit
    out = []
    for i in range(limit):
        chunk = points[int(i * step):max(int((i + 1) * step), int(i * step) + 1)]
        out.append(max(chunk, key=lambda p: sum(p[2:2 + n_cats])))
    return out


def _phase_only_timeline(m: dict[str, Any]) -> dict[str, Any] | None:
    """No per-op data (e.g. a failed replay): one point per phase at its peak."""
    phases = ((m.get("measured") or {}).get("memory") or {}).get("phase_peaks") or {}
    if not phases:
        return None
    cats = [c for c in ORDER]
    pts, spans = [], []
    for i, ph in enumerate(("forward", "backward", "optimizer")):
        if ph not in phases:
            continue
        start = len(pts)
        for _ in range(2):
            pts.append([len(pts), i] + [int(phases[ph].get(c, 0)) for c in cats])
        spans.append({"phase": ph, "start": start, "end": len(pts)})
    return {"categories": cats, "points": pts, "spans": spans, "x_label": "phase peaks (no per-op timeline)"}


def _prepare(m: dict[str, Any], tl: dict[str, Any] | None) -> dict[str, Any] | None:
    tl = tl or _phase_only_timeline(m)
    if not tl or not tl.get("points"):
        return None
    cats_in = list(tl["categories"])
    cats = [c for c in ORDER if c in cats_in] + [c for c in cats_in if c not in ORDER]
    idx = [cats_in.index(c) for c in cats]
    pts = [[p[0], p[1]] + [p[2 + j] for j in idx] for p in tl["points"]]
    pts = decimate(pts, len(cats))
    # drop categories that are zero everywhere (buffers of a model without any, ...)
    keep = [j for j, _ in enumerate(cats) if any(p[2 + j] for p in pts)]
    cats = [cats[j] for j in keep]
    pts = [[p[0], p[1]] + [p[2 + j] for j in keep] for p in pts]
    return {"categories": cats, "points": pts, "spans": tl.get("spans", []), "x_label": tl.get("x_label", "")}


def _overlays(m: dict[str, Any]) -> list[dict[str, Any]]:
    """Horizontal reference lines: predicted per-phase peaks / peak, measured allocator peaks."""
    out: list[dict[str, Any]] = []
    pred = m.get("predicted") or {}
    pp = pred.get("phase_peaks") or {}
    for ph, v in pp.items():
        out.append({"label": f"predicted {ph} peak (allocated)", "bytes": int(v), "phase": ph, "kind": "predicted"})
    pb = (pred.get("per_gpu_bytes") or {}).get("peak_allocated")
    if pb and not pp:
        out.append({"label": "predicted peak allocated", "bytes": int(pb), "phase": None, "kind": "predicted"})
    meas = m.get("measured") or {}
    for ph, v in (meas.get("cuda_phase_peaks") or {}).items():
        out.append({"label": f"measured {ph} peak allocated (torch.cuda)", "bytes": int(v["allocated"]),
                    "phase": ph, "kind": "allocator"})
    if meas.get("peak_reserved_bytes"):
        out.append({"label": "measured peak reserved (torch.cuda)", "bytes": int(meas["peak_reserved_bytes"]),
                    "phase": None, "kind": "reserved"})
    return out


def _title(m: dict[str, Any]) -> str:
    c = m.get("config", {})
    bits = [m.get("model", {}).get("name", "?"), str(c.get("method")), f"seq {c.get('seq_len')}",
            f"mb {c.get('micro_batch')}", str(c.get("precision")), f"ckpt {c.get('checkpointing')}",
            str(c.get("attention"))]
    if c.get("method") in ("lora", "qlora"):
        bits.insert(2, f"r{c.get('lora_rank')} {','.join(c.get('lora_target') or [])}")
    if c.get("packing"):
        bits.append("packed")
    if c.get("chunked_ce"):
        bits.append("chunked CE")
    if c.get("compile"):
        bits.append("compiled")
    return " · ".join(bits) + f" — {m.get('device')}"


def write_png(path: Path, m: dict[str, Any], data: dict[str, Any] | None) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(13, 5.2), dpi=110)
    if data is None:
        ax.text(0.5, 0.5, f"no memory timeline ({m.get('status')}: {m.get('message', '')[:80]})",
                ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        cats, pts = data["categories"], data["points"]
        overlays = _overlays(m)
        top = max([sum(p[2:]) for p in pts] + [o["bytes"] for o in overlays] + [1])
        div, unit = _unit(top)
        x = list(range(len(pts)))
        ys = [[p[2 + j] / div for p in pts] for j in range(len(cats))]
        ax.stackplot(x, ys, labels=[LABELS.get(c, c) for c in cats], colors=[COLORS.get(c, "#999") for c in cats],
                     alpha=0.9, linewidth=0)
        for s in data["spans"]:
            x0, x1 = _span_x(s, pts)
            ax.axvspan(x0, x1, color=PHASE_FILL.get(s["phase"], "#f4f4f4"), alpha=0.5, zorder=0)
            ax.axvline(x0, color="#555", lw=0.8, ls=":")
            narrow = (x1 - x0) < 0.08 * max(len(pts) - 1, 1)
            if narrow:  # a short phase (the optimizer step): label it vertically inside the plot
                ax.text(x1, top / div * 1.08, s["phase"], ha="right", va="top", fontsize=8, color="#333",
                        rotation=90)
            else:
                ax.text((x0 + x1) / 2, top / div * 1.02, s["phase"], ha="center", va="bottom", fontsize=9,
                        color="#333")
        styles = {"predicted": ("black", "--"), "allocator": ("#1f1f7a", "-."), "reserved": ("#7a1f1f", ":")}
        seen: set[str] = set()
        for o in overlays:
            col, ls = styles[o["kind"]]
            label = o["label"] if o["kind"] not in seen else None
            if o["kind"] == "predicted":
                label = "planner: predicted peak per phase" if "predicted" not in seen else None
            elif o["kind"] == "allocator":
                label = "measured peak per phase (torch.cuda allocated)" if "allocator" not in seen else None
            seen.add(o["kind"])
            spans = [s for s in data["spans"] if s["phase"] == o["phase"]] if o["phase"] else []
            if spans:
                for k, s in enumerate(spans):
                    x0, x1 = _span_x(s, pts)
                    ax.hlines(o["bytes"] / div, x0, x1, colors=col, linestyles=ls, lw=1.6,
                              label=label if k == 0 else None)
            else:
                ax.axhline(o["bytes"] / div, color=col, ls=ls, lw=1.4, label=label)
        ax.set_xlim(0, max(len(pts) - 1, 1))
        ax.set_ylim(0, top / div * 1.1)
        ax.set_ylabel(f"memory ({unit}, 1 {unit} = 2^{ {'GiB': 30, 'MiB': 20, 'KiB': 10}.get(unit, 0)} bytes)")
        ax.set_xlabel(data.get("x_label", ""))
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, framealpha=0.9, borderaxespad=0)
        ax.grid(axis="y", alpha=0.3)
    ax.set_title(_title(m), fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _span_x(span: dict[str, Any], pts: list[list]) -> tuple[int, int]:
    """Map a span in original point indices to positions in the (decimated) point list."""
    xs = [p[0] for p in pts]
    import bisect

    i0 = bisect.bisect_left(xs, span["start"])
    i1 = bisect.bisect_left(xs, span["end"])
    return i0, max(i1 - 1, i0)


def _fmt(n: float | None) -> str:
    if n is None:
        return "—"
    div, unit = _unit(abs(n))
    return f"{n / div:,.2f} {unit}" if unit != "B" else f"{int(n):,} B"


def _svg(m: dict[str, Any], data: dict[str, Any]) -> str:
    W, H, L, R, T, B = 1000, 430, 70, 20, 30, 40
    cats, pts = data["categories"], data["points"]
    overlays = _overlays(m)
    top = max([sum(p[2:]) for p in pts] + [o["bytes"] for o in overlays] + [1]) * 1.08
    n = max(len(pts) - 1, 1)

    def X(i: float) -> float:
        return L + (W - L - R) * i / n

    def Y(v: float) -> float:
        return T + (H - T - B) * (1 - v / top)

    parts = [f'<svg id="chart" viewBox="0 0 {W} {H}" width="{W}" height="{H}" '
             'font-family="sans-serif" font-size="11">']
    for s in data["spans"]:
        x0, x1 = _span_x(s, pts)
        parts.append(f'<rect x="{X(x0):.1f}" y="{T}" width="{max(X(x1) - X(x0), 1):.1f}" height="{H - T - B}" '
                     f'fill="{PHASE_FILL.get(s["phase"], "#f4f4f4")}"><title>{html.escape(s["phase"])}</title></rect>')
        narrow = (x1 - x0) < 0.08 * n
        anchor, tx = ("end", X(x1)) if narrow else ("middle", (X(x0) + X(x1)) / 2)
        parts.append(f'<text x="{tx:.1f}" y="{T - 8}" text-anchor="{anchor}">{html.escape(s["phase"])}</text>')
    # y grid
    div, unit = _unit(top)
    step = _nice_step(top / div / 6)
    v = 0.0
    while v * div <= top:
        y = Y(v * div)
        parts.append(f'<line x1="{L}" x2="{W - R}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
                     f'<text x="{L - 6}" y="{y + 4:.1f}" text-anchor="end">{v:g}</text>')
        v += step
    parts.append(f'<text x="14" y="{(T + H - B) / 2}" transform="rotate(-90 14 {(T + H - B) / 2})" '
                 f'text-anchor="middle">{unit}</text>')
    parts.append(f'<text x="{(L + W - R) / 2}" y="{H - 8}" text-anchor="middle">{html.escape(data.get("x_label", ""))}</text>')
    # stacked areas
    cum = [0.0] * len(pts)
    for j, c in enumerate(cats):
        lower = cum[:]
        cum = [cum[i] + pts[i][2 + j] for i in range(len(pts))]
        up = " ".join(f"{X(i):.1f},{Y(cum[i]):.1f}" for i in range(len(pts)))
        down = " ".join(f"{X(i):.1f},{Y(lower[i]):.1f}" for i in reversed(range(len(pts))))
        parts.append(f'<polygon points="{up} {down}" fill="{COLORS.get(c, "#999")}" fill-opacity="0.9">'
                     f'<title>{html.escape(LABELS.get(c, c))}</title></polygon>')
    # overlays
    styles = {"predicted": ("#000", "6,4"), "allocator": ("#1f1f7a", "2,3"), "reserved": ("#7a1f1f", "1,3")}
    for o in overlays:
        col, dash = styles[o["kind"]]
        spans = [s for s in data["spans"] if s["phase"] == o["phase"]] if o["phase"] else []
        segs = [_span_x(s, pts) for s in spans] or [(0, n)]
        for x0, x1 in segs:
            y = Y(o["bytes"])
            parts.append(f'<line x1="{X(x0):.1f}" x2="{X(x1):.1f}" y1="{y:.1f}" y2="{y:.1f}" stroke="{col}" '
                         f'stroke-width="2" stroke-dasharray="{dash}"><title>{html.escape(o["label"])}: '
                         f'{_fmt(o["bytes"])}</title></line>')
    parts.append(f'<line id="cursor" x1="0" x2="0" y1="{T}" y2="{H - B}" stroke="#333" stroke-width="1" visibility="hidden"/>')
    parts.append(f'<rect x="{L}" y="{T}" width="{W - L - R}" height="{H - T - B}" fill="none" stroke="#888"/>')
    parts.append("</svg>")
    return "\n".join(parts)


def _nice_step(raw: float) -> float:
    import math

    if raw <= 0:
        return 1.0
    e = 10 ** math.floor(math.log10(raw))
    for f in (1, 2, 2.5, 5, 10):
        if raw <= f * e:
            return f * e
    return 10 * e


_SCRIPT = """
(function(){
  var d = JSON.parse(document.getElementById('timeline-data').textContent);
  var svg = document.getElementById('chart'); if (!svg || !d.points.length) return;
  var box = document.getElementById('hover'), cur = document.getElementById('cursor');
  var L = 70, R = 20, W = 1000, n = Math.max(d.points.length - 1, 1);
  function fmt(b){ var u=[['GiB',1073741824],['MiB',1048576],['KiB',1024]];
    for (var i=0;i<u.length;i++) if (b >= 2*u[i][1]) return (b/u[i][1]).toFixed(2)+' '+u[i][0];
    return b+' B'; }
  svg.addEventListener('mousemove', function(ev){
    var r = svg.getBoundingClientRect(), x = (ev.clientX - r.left) * W / r.width;
    var i = Math.round((x - L) / (W - L - R) * n); if (i < 0 || i > n) return;
    var p = d.points[i], tot = 0, rows = [];
    for (var j = 0; j < d.categories.length; j++){ tot += p[2+j]; rows.push(d.categories[j] + ': ' + fmt(p[2+j])); }
    box.textContent = 'point ' + p[0] + ' (' + (d.phase_names[p[1]] || '-') + ')  total ' + fmt(tot) + '   ' + rows.join('   ');
    var sx = L + (W - L - R) * i / n; cur.setAttribute('x1', sx); cur.setAttribute('x2', sx);
    cur.setAttribute('visibility', 'visible');
  });
})();
"""


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    h = "".join(f"<th>{html.escape(str(x))}</th>" for x in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(x))}</td>" for x in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def write_html(path: Path, m: dict[str, Any], data: dict[str, Any] | None) -> None:
    title = _title(m)
    meas = m.get("measured") or {}
    mem = meas.get("memory") or {}
    phases = mem.get("phase_peaks") or {}
    cats = [c for c in ORDER if any(c in v for v in phases.values())] + ["total"]
    phase_rows = [[ph] + [_fmt(v.get(c)) for c in cats] for ph, v in phases.items()]
    cmp_rows = [[r["metric"], _fmt(r["measured"]) if r["unit"] == "bytes" else f'{r["measured"]:,.0f}',
                 _fmt(r["predicted"]) if r["unit"] == "bytes" else f'{r["predicted"]:,.0f}',
                 f'{r["rel_error"]:+.1%}' if r.get("rel_error") is not None else "—"] for r in m.get("comparison", [])]
    legend = "".join(f'<span class="key"><i style="background:{COLORS.get(c, "#999")}"></i>{html.escape(LABELS.get(c, c))}</span>'
                     for c in (data or {}).get("categories", []))
    legend += ('<span class="key"><i class="dash" style="border-color:#000"></i>planner: predicted peak per phase</span>'
               if (m.get("predicted") or {}).get("phase_peaks") else "")
    if m.get("device") == "cuda":
        legend += ('<span class="key"><i class="dash" style="border-color:#1f1f7a"></i>measured peak allocated per phase'
                   '</span><span class="key"><i class="dash" style="border-color:#7a1f1f"></i>measured peak reserved</span>')
    timing = [["step time (median)", f'{meas["step_time_s"]:.4f} s' if meas.get("step_time_s") else "—"],
              ["tokens / step", meas.get("tokens_per_step", "—")],
              ["tokens / s", f'{meas["tokens_per_s"]:,.0f}' if meas.get("tokens_per_s") else "—"],
              ["MFU", f'{meas["mfu"]:.1%}' if meas.get("mfu") else "—"]]
    env = m.get("environment") or {}
    vers = env.get("versions") or {}
    env_rows = [[k, v] for k, v in [("device", env.get("device_name")), ("driver", env.get("driver")),
                                    ("CUDA", env.get("cuda_version"))] if v] + [[k, v] for k, v in vers.items() if v]
    pred_err = (m.get("predicted") or {}).get("error")
    embed = {"categories": (data or {}).get("categories", []), "points": (data or {}).get("points", []),
             "spans": (data or {}).get("spans", []), "phase_names": ["forward", "backward", "optimizer"],
             "overlays": _overlays(m)}
    chart = _svg(m, data) if data else f"<p>No memory timeline: {html.escape(str(m.get('status')))} {html.escape(m.get('message', ''))}</p>"
    notes = "".join(f"<li>{html.escape(str(n))}</li>" for n in m.get("notes", []))
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>tuneplan memory timeline — {html.escape(title)}</title>
<style>
body{{font-family:sans-serif;margin:24px;color:#222;max-width:1060px}} h1{{font-size:18px}} h2{{font-size:15px;margin-top:22px}}
table{{border-collapse:collapse;font-size:12px}} td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
th{{background:#f3f3f3}} td:first-child{{text-align:left}} .key{{margin-right:14px;font-size:12px;white-space:nowrap}}
.key i{{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:middle}}
.key i.dash{{height:0;width:18px;border-top:2px dashed}} #hover{{font:12px monospace;min-height:16px;color:#333}}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Status: <b>{html.escape(str(m.get('status')))}</b> {html.escape(m.get('message', ''))} · {html.escape(str(m.get('run', {}).get('date_utc', '')))}
 · bytes alive during one training step, stacked by category (1 GiB = 2^30 bytes).</p>
<div>{legend}</div>
{chart}
<div id="hover"></div>
<h2>Per-phase peaks (measured, by category)</h2>
{_table(["phase"] + cats, phase_rows) if phase_rows else "<p>—</p>"}
<h2>Measured vs planner</h2>
{_table(["metric", "measured", "predicted", "rel. error (pred − meas) / meas"], cmp_rows) if cmp_rows else f"<p>No comparison{': ' + html.escape(pred_err) if pred_err else ''}</p>"}
<h2>Speed</h2>
{_table(["", "value"], timing)}
<h2>Configuration</h2>
<pre>{html.escape(json.dumps(m.get("config", {}), indent=1))}</pre>
<h2>Environment</h2>
{_table(["", ""], env_rows)}
<p>Command: <code>{html.escape(str(m.get('run', {}).get('command', '')))}</code></p>
{f"<h2>Notes</h2><ul>{notes}</ul>" if notes else ""}
{"<p>CUDA allocator snapshot: memory_snapshot.pickle (open it in pytorch.org/memory_viz).</p>" if m.get("device") == "cuda" else ""}
<script type="application/json" id="timeline-data">{_json_for_script(embed)}</script>
<script>{_SCRIPT}</script>
</body></html>
"""
    path.write_text(page)


def _json_for_script(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":")).replace("</", "<\\/")


def write_timeline(out_dir: Path, m: dict[str, Any], tl: dict[str, Any] | None) -> dict[str, str]:
    """timeline.png + timeline.html in `out_dir`; returns {"timeline_png": name, "timeline_html": name}."""
    out_dir = Path(out_dir)
    data = _prepare(m, tl)
    write_png(out_dir / "timeline.png", m, data)
    write_html(out_dir / "timeline.html", m, data)
    return {"timeline_png": "timeline.png", "timeline_html": "timeline.html"}
