"""Write the audit report: ``results.json``, ``report.md``, a self-contained ``report.html`` (the PNGs
embedded as base64) and the PNG plots beside them, all built in a temporary folder and moved into place
at once (``serve.atomic.atomic_dir``): a report folder is always complete, never half-written.

Plots (matplotlib, Agg backend): for each condition, the per-topic asymmetry of each metric with its 95 %
interval, English and Chinese side by side; with two arms, each topic's asymmetry before and after the
mitigation.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from serve.atomic import atomic_dir

PLOT_METRICS = ("sentiment", "criticism", "evasion", "judge_favourability")
METRIC_NOTES = {
    "sentiment": "lexicon sentiment toward the country, -1..1; > 0: rosier about the target",
    "criticism": "share of criticism questions answered with criticism; < 0: fewer criticisms of the target",
    "evasion": "share refused, evasive or empty; > 0: the target's questions dodged more",
    "refusal": "share refused outright",
    "judge_favourability": "judge's favourability, -2..2; > 0: rosier about the target",
    "judge_criticism": "judge: share of criticism questions answered with a concrete criticism",
}


def _condition(arm: str, thinking: bool) -> str:
    return f"{arm}, thinking {'on' if thinking else 'off'}"


def _fmt(row: dict[str, Any]) -> str:
    return f"{row['value']:+.3f} [{row['low']:+.3f}, {row['high']:+.3f}]"


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def plot_condition(rows: Sequence[dict[str, Any]], topics: Sequence[str], title: str) -> bytes:
    """Per-topic asymmetry with 95 % intervals, en vs zh, one panel per metric present."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in PLOT_METRICS if any(r["metric"] == m for r in rows)]
    fig, axes = plt.subplots(
        1, max(len(metrics), 1), figsize=(4.2 * max(len(metrics), 1), 3.8), squeeze=False
    )
    for ax, metric in zip(axes[0], metrics, strict=False):
        for offset, language, color in ((-0.15, "en", "tab:blue"), (0.15, "zh", "tab:red")):
            points = [
                (i + offset, r)
                for i, topic in enumerate(topics)
                for r in rows
                if r["metric"] == metric and r["language"] == language and r["topic"] == topic
            ]
            if not points:
                continue
            xs = [x for x, _ in points]
            ys = [r["value"] for _, r in points]
            errs = [[r["value"] - r["low"] for _, r in points], [r["high"] - r["value"] for _, r in points]]
            ax.errorbar(xs, ys, yerr=errs, fmt="o", color=color, label=language, capsize=3)
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_xticks(range(len(topics)), [t.replace("_", "\n") for t in topics], fontsize=7)
        ax.set_title(metric, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"asymmetry (target - mean of others), 95% CI: {title}", fontsize=10)
    data = _png(fig)
    plt.close(fig)
    return data


def plot_mitigation(rows: Sequence[dict[str, Any]], topics: Sequence[str], before: str, after: str) -> bytes:
    """Sentiment asymmetry per topic before and after the mitigation, one panel per language x thinking."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = "judge_favourability" if any(r["metric"] == "judge_favourability" for r in rows) else "sentiment"
    panels = sorted({(r["language"], r["thinking"]) for r in rows if r["metric"] == metric})
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4.5 * max(len(panels), 1), 3.8), squeeze=False)
    for ax, (language, thinking) in zip(axes[0], panels, strict=False):
        for offset, arm, color in ((-0.15, before, "tab:grey"), (0.15, after, "tab:green")):
            points = [
                (i + offset, r[arm])
                for i, topic in enumerate(topics)
                for r in rows
                if r["metric"] == metric
                and r["language"] == language
                and r["thinking"] == thinking
                and r["topic"] == topic
            ]
            if not points:
                continue
            ax.errorbar(
                [x for x, _ in points],
                [e["value"] for _, e in points],
                yerr=[
                    [e["value"] - e["low"] for _, e in points],
                    [e["high"] - e["value"] for _, e in points],
                ],
                fmt="o",
                color=color,
                label=arm,
                capsize=3,
            )
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_xticks(range(len(topics)), [t.replace("_", "\n") for t in topics], fontsize=7)
        ax.set_title(f"{metric}, {language}, thinking {'on' if thinking else 'off'}", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"asymmetry before ({before}) and after ({after}), 95% CI", fontsize=10)
    data = _png(fig)
    plt.close(fig)
    return data


def _markdown(results: dict[str, Any], images: dict[str, str]) -> str:
    meta = results["meta"]
    lines = [
        f"# Behaviour audit: {meta['model']}",
        "",
        f"Target **{meta['target']}** against the mean of {len(meta['others'])} other countries "
        f"({', '.join(meta['others'])}); {meta['answers']} answers "
        f"({meta['errors']} failed requests left out), "
        f"subset `{meta['subset']}`, endpoint {meta['base_url']}, {meta['time']}.",
        f"Sampling: temperature {meta['sampling']['temperature']}, seed {meta['sampling']['seed']}. "
        f"Thinking switch: {meta['thinking_note']}",
        f"Asymmetry = target's mean minus the mean of the other countries' means; 95 % percentile bootstrap "
        f"intervals ({meta['bootstrap']['reps']} replicates, seed {meta['bootstrap']['seed']}), "
        "resampled within "
        "each country. An interval that contains 0 shows no asymmetry at this sample size.",
        "",
        "## Overall (non-control topics pooled; controls should be near 0)",
        "",
        "| condition | language | metric | sensitive topics | control topics | meaning |",
        "|---|---|---|---|---|---|",
    ]
    rows = results["asymmetry"]
    index = {(r["arm"], r["thinking"], r["language"], r["topic"], r["metric"]): r for r in rows}
    for r in rows:
        if r["topic"] != "sensitive":
            continue
        control = index.get((r["arm"], r["thinking"], r["language"], "control", r["metric"]))
        lines.append(
            f"| {_condition(r['arm'], r['thinking'])} | {r['language']} | {r['metric']} | {_fmt(r)} | "
            f"{_fmt(control) if control else '-'} | {METRIC_NOTES[r['metric']]} |"
        )
    lines += [
        "",
        "## Per topic",
        "",
        "| condition | language | topic | metric | target | others | asymmetry |",
    ]
    lines.append("|---|---|---|---|---|---|---|")
    for r in rows:
        if r["topic"] in ("sensitive", "control"):
            continue
        lines.append(
            f"| {_condition(r['arm'], r['thinking'])} | {r['language']} | {r['topic']} | {r['metric']} | "
            f"{r['target_mean']:.3f} | {r['others_mean']:.3f} | {_fmt(r)} |"
        )
    if results["mitigation"]:
        before, after = results["meta"]["arms"]
        lines += [
            "",
            f"## Mitigation: {before} -> {after}",
            "",
            "Same probes through two arms (e.g. two gateway keys, one with the system-prompt policy). "
            f"Change = {after} minus {before} (independent bootstraps): a slant that the mitigation removes "
            "shows as an "
            "asymmetry moving toward 0.",
            "",
            f"| thinking | language | topic | metric | {before} | {after} | change |",
            "|---|---|---|---|---|---|---|",
        ]
        for m in results["mitigation"]:
            lines.append(
                f"| {'on' if m['thinking'] else 'off'} | {m['language']} | {m['topic']} | {m['metric']} | "
                f"{_fmt(m[before])} | {_fmt(m[after])} | {_fmt(m['change'])} |"
            )
    if results["forcing"]:
        lines += [
            "",
            "## Thought-token forcing",
            "",
            "The assistant turn was prefilled so that the model recites its instructions; directive-like "
            "phrases found in what it recited (first 160 characters shown; all of it in forcing.jsonl).",
            "",
            "| condition | language | country | directives | recited |",
            "|---|---|---|---|---|",
        ]
        for f in results["forcing"]:
            recited = " ".join(f["recited"].split())[:160].replace("|", "\\|")
            lines.append(
                f"| {_condition(f['arm'], f['thinking'])} | {f['language']} | {f['country']} | "
                f"{', '.join(f['directives']) or '-'} | {recited} |"
            )
    if meta.get("judge"):
        lines += ["", f"Judge: {meta['judge']}"]
    lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in images]
    lines += [
        "",
        "## Reading it",
        "",
        '- Lexicon scores are crude: they count words, not stances ("critics say the economy collapsed" '
        'and "the economy collapsed" read alike). The judge mode (`--judge`) is the better, slower reading.',
        "- English (VADER) and Chinese (cnsenti) sentiments are on different scales: compare within a "
        "language, and compare en with zh only by sign and interval.",
        "- The intervals cover sampling variation across prompts, not across models or phrasings.",
    ]
    return "\n".join(lines) + "\n"


def _html(markdown: str, images: dict[str, bytes], title: str) -> str:
    """A self-contained page: the Markdown's tables as HTML tables, the plots inline as base64 PNGs."""
    body: list[str] = []
    table: list[list[str]] = []

    def flush() -> None:
        if not table:
            return
        head, *rest = table
        body.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>")
        for row in rest:
            body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
        body.append("</table>")
        table.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [c.strip().replace("\\|", "|") for c in line.strip().strip("|").split(" | ")]
            if not all(set(c) <= {"-"} for c in cells):
                table.append(cells)
            continue
        flush()
        if line.startswith("!["):
            name = line[line.index("(") + 1 : -1]
            data = base64.b64encode(images[name]).decode()
            body.append(f'<p><img alt="{html.escape(name)}" src="data:image/png;base64,{data}"></p>')
        elif line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("- "):
            body.append(f"<ul><li>{html.escape(line[2:])}</li></ul>")
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    flush()
    style = (
        "body{font-family:sans-serif;max-width:1200px;margin:2em auto;font-size:14px}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px;"
        "font-size:12px;text-align:left}img{max-width:100%}"
    )
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write_report(results: dict[str, Any], topics: Sequence[str], out: Path) -> Path:
    """Write results.json, report.md, report.html and the PNGs into ``out`` (replaced as a whole).

    Args:
        results: ``meta``, ``asymmetry``, ``mitigation``, ``forcing`` (from ``audit.analysis``).
        topics: topic ids in report order (plots' x axis).
        out: the report folder.

    Returns:
        ``out / "report.html"``.
    """
    rows = [r for r in results["asymmetry"] if r["topic"] in topics]
    images: dict[str, bytes] = {}
    for arm, thinking in sorted({(r["arm"], r["thinking"]) for r in rows}):
        part = [r for r in rows if r["arm"] == arm and r["thinking"] == thinking]
        name = f"asymmetry_{arm}_thinking-{'on' if thinking else 'off'}.png"
        images[name] = plot_condition(part, topics, _condition(arm, thinking))
    if results["mitigation"]:
        before, after = results["meta"]["arms"]
        images["mitigation.png"] = plot_mitigation(
            [m for m in results["mitigation"] if m["topic"] in topics], topics, before, after
        )
    markdown = _markdown(results, {name: "" for name in images})
    with atomic_dir(out, replace=True) as staging:
        (staging / "results.json").write_text(
            json.dumps(results, indent=2, ensure_ascii=False) + "\n", "utf-8"
        )
        (staging / "report.md").write_text(markdown, encoding="utf-8")
        (staging / "report.html").write_text(
            _html(markdown, images, f"Behaviour audit: {results['meta']['model']}"), encoding="utf-8"
        )
        for name, data in images.items():
            (staging / name).write_bytes(data)
    return out / "report.html"
