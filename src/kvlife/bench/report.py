"""`kvlife report RUN_DIR [...] --out report.html`: one self-contained HTML page.

Sections: a score table (task x turn for each run, with sample counts, and the run's average per
turn and over all turns); for each run with a dense run of the same samples beside it, the paired
difference against dense per task and turn with its 95% bootstrap interval over samples (marked
worse or better only when the interval excludes 0); three plots: turn curves (score against turn
index, one line per recipe and mode: SCBench's plot of decay over turns; a turn's point averages
only the tasks that have that turn, and says how many), accuracy against cache bytes (one line per
method and mode, its budgets joined in order of bytes), multi-turn against multi-request for the
same recipe (a mode not run is marked, not drawn as zero); then each run's configuration and
versions, with the raw config.json. Each run keeps one colour in every plot. Plots are PNGs
(matplotlib, Agg) embedded as base64; the page needs no network and no horizontal scrolling at
1280 px."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.figure import Figure

from kvlife.bench.summary import write_summary
from kvlife.errors import ResultsError


def load_runs(run_dirs: list[Path]) -> list[dict[str, Any]]:
    runs = []
    for run_dir in run_dirs:
        if not (run_dir / "predictions.jsonl").is_file():
            raise ResultsError(f"{run_dir} is not a kvlife run directory (no predictions.jsonl)")
        summary = write_summary(run_dir)
        config = json.loads((run_dir / "config.json").read_text())
        runs.append(
            {"dir": run_dir, "summary": summary, "config": config, "identity": config.get("identity", {})}
        )
    _name_settings(runs)
    return runs


# What makes two runs comparable: everything but the method and the mode.
_SETTING_FIELDS = (
    "model",
    "tasks",
    "profile",
    "samples",
    "seed",
    "max_turns",
    "prompt_format",
    "own_answers",
    "recompress",
    "data",
    "max_length",
    "backend",
)


def _setting(run: dict[str, Any]) -> str:
    return json.dumps([run["identity"].get(k) for k in _SETTING_FIELDS], default=str)


def _name_settings(runs: list[dict[str, Any]]) -> None:
    """Give each run a `setting` name: empty when all runs share one setting, else what differs."""
    settings = {_setting(run) for run in runs}
    for run in runs:
        run["setting"] = ""
    if len(settings) <= 1:
        return
    for field in _SETTING_FIELDS:
        values = {json.dumps(run["identity"].get(field), default=str) for run in runs}
        if len(values) > 1:
            for run in runs:
                value = run["identity"].get(field)
                if field == "tasks" and isinstance(value, list):
                    value = ",".join(value) if len(value) <= 2 else f"{len(value)} tasks"
                run["setting"] += f" · {value if field in ('tasks', 'model') else f'{field}={value}'}"


def _label(run: dict[str, Any], mode: bool = True) -> str:
    identity = run["identity"]
    text = identity.get("method", "?") + (f" · {identity.get('mode', '?')}" if mode else "")
    return text + run.get("setting", "")


def turn_means(summary: dict[str, Any]) -> dict[int, tuple[float, int]]:
    """Per turn: the mean score over the tasks that have that turn, and how many tasks that is."""
    per_turn: dict[int, list[float]] = {}
    for stats in summary["tasks"].values():
        for turn, value in stats["per_turn"].items():
            if value is not None:
                per_turn.setdefault(int(turn), []).append(value)
    return {turn: (sum(values) / len(values), len(values)) for turn, values in per_turn.items()}


def _colours(runs: list[dict[str, Any]]) -> None:
    """One colour per run, used by every plot."""
    palette = colormaps["tab10" if len(runs) <= 10 else "tab20"].colors
    for index, run in enumerate(runs):
        run["colour"] = palette[index % len(palette)]


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def _plots(runs: list[dict[str, Any]]) -> dict[str, str]:
    _colours(runs)
    return {"turns": _turns_plot(runs), "bytes": _bytes_plot(runs), "modes": _modes_plot(runs)}


def _axes():
    fig = Figure(figsize=(6.4, 3.8))  # no pyplot: no GUI backend, no global figure list
    return fig, fig.subplots()


def _turns_plot(runs: list[dict[str, Any]]) -> str:
    """Per turn, the mean over the tasks that have that turn (n tasks, written beside it)."""
    fig, ax = _axes()
    for run in runs:
        points = turn_means(run["summary"])
        turns = sorted(points)
        ax.plot(turns, [points[t][0] for t in turns], marker="o", label=_label(run), color=run["colour"])
        n_tasks = len(run["summary"]["tasks"])
        for turn in turns:
            value, n = points[turn]
            if n < n_tasks:  # fewer tasks than the run has: say so beside the point
                ax.annotate(f"n={n}", (turn, value), fontsize=6, color=run["colour"], xytext=(3, -9),
                            textcoords="offset points")
    if not any(run["summary"]["tasks"] for run in runs):
        _no_data(ax)
    ax.set_xticks(sorted({int(t) for run in runs for stats in run["summary"]["tasks"].values()
                          for t in stats["per_turn"]}) or [1])
    ax.set_xlabel("turn")
    ax.set_ylabel("score (mean over the tasks with that turn)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Score by turn")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(fig)


def _bytes_plot(runs: list[dict[str, Any]]) -> str:
    """Accuracy against cache bytes: one line per method (its budgets joined, by bytes) and mode."""
    fig, ax = _axes()
    families: dict[tuple[str, str], list[tuple[float, float, str]]] = {}
    family_colour: dict[tuple[str, str], Any] = {}
    for run in runs:
        overall, identity = run["summary"]["overall"], run["identity"]
        if overall["cache_bytes"] and overall["all_turns"] is not None:
            method = identity.get("method", "?")
            family = method.split("(")[0]
            key = (f"{family} · {identity.get('mode', '?')}{run['setting']}", _setting(run))
            families.setdefault(key, []).append(
                (overall["cache_bytes"] / 2**20, overall["all_turns"], method[len(family):]))
            family_colour.setdefault(key, run["colour"])  # a one-run family keeps its run's colour
    for key, points in sorted(families.items()):
        points.sort()
        line = ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=key[0],
                       color=family_colour[key])[0]
        for x, y, params in points:
            if params:
                ax.annotate(params, (x, y), fontsize=6, color=line.get_color(), xytext=(3, 3),
                            textcoords="offset points")
    if not families:
        _no_data(ax)
    ax.set_xlabel("K/V cache held (MiB, mean over turns)")
    ax.set_ylabel("score (all turns)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Accuracy against cache size")
    if families:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(fig)


def _modes_plot(runs: list[dict[str, Any]]) -> str:
    """Multi-turn against multi-request per recipe: one bar per run, in the run's colour."""
    by_method: dict[str, dict[str, dict[str, Any]]] = {}
    for run in runs:
        if run["summary"]["overall"]["all_turns"] is not None:
            by_method.setdefault(_label(run, mode=False), {})[run["identity"].get("mode", "?")] = run
    fig, ax = _axes()
    methods = sorted(by_method)
    width = 0.38
    for offset, mode in ((-width / 2, "multi-turn"), (width / 2, "multi-request")):
        for i, method in enumerate(methods):
            run = by_method[method].get(mode)
            if run is None:
                ax.text(i + offset, 0.02, "not run", rotation=90, ha="center", va="bottom", fontsize=6,
                        color="#888")
                continue
            ax.bar(i + offset, run["summary"]["overall"]["all_turns"], width=width, color=run["colour"],
                   label=_label(run), hatch="" if mode == "multi-turn" else "//", edgecolor="white")
            ax.text(i + offset, 0.01, "MT" if mode == "multi-turn" else "MR", ha="center", va="bottom",
                    fontsize=6, color="white")
    if not methods:
        _no_data(ax)
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels(methods, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("score (all turns)")
    ax.set_ylim(0, 1.02)
    ax.set_title("Multi-turn (MT) against multi-request (MR)")
    if methods:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(fig)


def _no_data(ax) -> None:
    ax.text(
        0.5,
        0.5,
        "no scored rows in these runs",
        ha="center",
        va="center",
        transform=ax.transAxes,
        color="#888",
    )


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if isinstance(value, float) else html.escape(str(value))


def _score_table(runs: list[dict[str, Any]]) -> str:
    max_turn = max((int(t) for run in runs for stats in run["summary"]["tasks"].values()
                    for t in stats["per_turn"]), default=0)
    head = "".join(f"<th>turn {t}</th>" for t in range(1, max_turn + 1))
    rows = []
    for run in runs:
        tasks = run["summary"]["tasks"]
        for task, stats in tasks.items():
            cells = "".join(f"<td>{_fmt(stats['per_turn'].get(str(t)))}</td>" for t in range(1, max_turn + 1))
            mib = stats["cache_bytes"] / 2**20 if stats["cache_bytes"] else None
            rows.append(f"<tr><td>{html.escape(_label(run))}</td><td>{html.escape(task)}</td>"
                        f"<td>{stats['samples']}</td>{cells}"
                        f"<td>{_fmt(stats['all_turns'])}</td><td>{_fmt(stats['reference_nll'])}</td>"
                        f"<td>{_fmt(stats['dense_agreement'])}</td><td>{_fmt(mib)}</td></tr>")
        overall = run["summary"]["overall"]
        points = turn_means(run["summary"])
        means = [points[t][0] if t in points else None for t in range(1, max_turn + 1)]
        mib = overall["cache_bytes"] / 2**20 if overall["cache_bytes"] else None
        rows.append(f"<tr class='avg'><td>{html.escape(_label(run))}</td><td>average</td><td></td>"
                    f"{''.join(f'<td>{_fmt(v)}</td>' for v in means)}<td>{_fmt(overall['all_turns'])}</td>"
                    f"<td>{_fmt(overall['reference_nll'])}</td><td>{_fmt(overall['dense_agreement'])}</td>"
                    f"<td>{_fmt(mib)}</td></tr>")
    return (f"<table id='scores'><thead><tr><th>run</th><th>task</th><th>n</th>{head}<th>all</th><th>NLL</th>"
            f"<th>=dense</th><th>KV MiB</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _diff_cell(found: dict[str, Any] | None) -> str:
    if not found:
        return "<td>–</td>"
    return (f"<td class='{found['verdict']}'>{found['diff']:+.2f} "
            f"<span class='ci'>[{found['ci_low']:+.2f}, {found['ci_high']:+.2f}]</span></td>")


def _dense_table(runs: list[dict[str, Any]]) -> str:
    """Per run with a dense reference: method minus dense per task and turn, 95% paired interval."""
    compared = [run for run in runs if any(s.get("vs_dense") for s in run["summary"]["tasks"].values())]
    if not compared:
        return "<p>No run here has a dense run of the same samples beside it.</p>"
    max_turn = max(
        int(t) for run in compared for stats in run["summary"]["tasks"].values() for t in stats["per_turn"]
    )
    head = "".join(f"<th>turn {t}</th>" for t in range(1, max_turn + 1))
    rows = []
    for run in compared:
        for task, stats in run["summary"]["tasks"].items():
            found = stats.get("vs_dense") or {}
            cells = "".join(_diff_cell(found.get("per_turn", {}).get(str(t))) for t in range(1, max_turn + 1))
            rows.append(f"<tr><td>{html.escape(_label(run))}</td><td>{html.escape(task)}</td>"
                        f"<td>{stats['samples']}</td>{cells}{_diff_cell(found.get('all_turns'))}</tr>")
        overall = run["summary"]["overall"].get("vs_dense") or {}
        rows.append(f"<tr class='avg'><td>{html.escape(_label(run))}</td><td>all tasks</td><td></td>"
                    f"{_diff_cell(overall.get('turn1'))}{'<td></td>' * (max_turn - 1)}"
                    f"{_diff_cell(overall.get('all_turns'))}</tr>")
    return (
        f"<table id='vs-dense'><thead><tr><th>run</th><th>task</th><th>n</th>{head}<th>all</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


_CONFIG_FIELDS = ("model", "method", "mode", "profile", "samples", "seed", "max_turns", "prompt_format",
                  "own_answers", "recompress", "data", "max_length", "context_tokens", "dtype", "backend",
                  "base_url")
_VERSION_FIELDS = ("kvlife", "torch", "transformers", "python", "machine")


def _config_table(runs: list[dict[str, Any]]) -> str:
    head = "".join(f"<th>{name}</th>" for name in ("run", "created", *_CONFIG_FIELDS, *_VERSION_FIELDS))
    rows = []
    for run in runs:
        identity, versions = run["identity"], run["config"].get("versions", {})
        identity = {**identity, "dtype": identity.get("dtype", run["config"].get("dtype"))}
        cells = [run["dir"].name, run["config"].get("created")] + [identity.get(k) for k in _CONFIG_FIELDS]
        cells += [versions.get(k) for k in _VERSION_FIELDS]
        rows.append("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in cells) + "</tr>")
    return f"<table id='runs'><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def write_html(run_dirs: list[Path], out: Path) -> Path:
    runs = load_runs(run_dirs)
    plots = _plots(runs)
    figures = "".join(
        f"<figure id='plot-{name}'><img alt='{name}' src='data:image/png;base64,{data}'></figure>"
        for name, data in plots.items()
    )
    configs = "".join(
        f"<details><summary>{html.escape(run['dir'].name)}</summary><pre>"
        f"{html.escape(json.dumps(run['config'], indent=2))}</pre></details>"
        for run in runs
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>kvlife report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1200px; }}
table {{ border-collapse: collapse; font-size: 13px; max-width: 100%; }}
th, td {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; overflow-wrap: anywhere; }}
td:first-child, td:nth-child(2) {{ text-align: left; }}
#runs {{ font-size: 11px; }}
#runs td {{ text-align: left; }}
tr.avg {{ font-weight: bold; background: #f4f4f4; }}
td.worse {{ background: #fbd5d5; }}
td.better {{ background: #d5f5dc; }}
.ci {{ color: #666; font-size: 11px; white-space: nowrap; }}
figure {{ display: inline-block; margin: 1em; max-width: 100%; }}
figure img {{ max-width: 100%; height: auto; }}
pre {{ white-space: pre-wrap; overflow-wrap: anywhere; }}
</style></head><body>
<h1>kvlife report</h1>
<p>{len(runs)} run(s). Scores are in [0, 1], per task and turn (n: samples); <i>all</i> is the mean
over every turn, NLL the reference answer's mean negative log-likelihood per token, =dense how often
the answer equals a sibling dense run's, KV MiB the cache held while answering.</p>
<h2>Scores by task and turn</h2>
{_score_table(runs)}
<h2>Against dense</h2>
<p>Method minus dense on the same samples, per task and turn, with the 95% paired bootstrap interval
over samples. A cell is <span style="background:#fbd5d5">worse</span> or
<span style="background:#d5f5dc">better</span> only when its whole interval lies below or above 0;
any other difference is no difference, whatever the point estimate says.</p>
{_dense_table(runs)}
<h2>Plots</h2>
{figures}
<h2>Configurations and versions</h2>
{_config_table(runs)}
{configs}
</body></html>
"""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(page)
    except OSError as exc:
        raise ResultsError(f"cannot write the report to {out}: {exc.strerror or exc}") from None
    return out
