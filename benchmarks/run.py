"""Run every benchmark side by side in one run and write ``docs/benchmarks.md`` with plots.

    python benchmarks/run.py              # the full run (several minutes) -> docs/benchmarks.md
    python benchmarks/run.py --quick      # small sizes, few rounds: checks the harness works
    python benchmarks/run.py --only bench_start,bench_replicas --output /tmp/b/benchmarks.md

Each ``benchmarks/bench_*.py`` module exposes ``run(quick: bool) -> list[dict]`` (rows described
in ``benchmarks/common.py``) and runs in a fresh interpreter of its own, so that one module's
imports and memory never colour another's figures. A module that is missing or fails is named in
the report; the others still run. Exit status 1 when a module failed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import json
import math
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from common import machine  # noqa: E402

MODULES = (
    "bench_fetch",
    "bench_link",
    "bench_s3",
    "bench_start",
    "bench_load",
    "bench_cold_start",
    "bench_memory",
    "bench_replicas",
    "bench_int8",
)
"""The benchmark modules, in the order the report shows them."""

META_KEYS = {
    "figure",
    "title",
    "goal",
    "met",
    "better",
    "note",
    "limits",
    "unit",
    "low",
    "high",
    "n",
    "median",
    "values",
    "section",
}


# -- running the modules ----------------------------------------------------------------------


@dataclass
class ModuleResult:
    """What one benchmark module gave: its rows, or why it gave none."""

    name: str
    status: str  # "ok", "missing" or "error"
    title: str = ""
    rows: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""
    seconds: float = 0.0


def run_child(name: str, quick: bool, results: Path) -> int:
    """In the child interpreter: import ``name``, call ``run(quick)``, write the JSON result."""
    began = time.perf_counter()
    out: dict[str, Any] = {"name": name, "status": "ok", "rows": [], "title": ""}
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name != name:
            raise
        out["status"] = "missing"
        out["error"] = f"benchmarks/{name}.py is not there yet"
    else:
        doc = (module.__doc__ or "").strip().splitlines()
        out["title"] = doc[0].rstrip(".") if doc else name
        try:
            rows = module.run(quick)
            out["rows"] = [dict(r) for r in rows]
        except Exception:
            out["status"] = "error"
            out["error"] = traceback.format_exc(limit=8)
            traceback.print_exc()
    out["seconds"] = time.perf_counter() - began
    results.write_text(json.dumps(out, default=_jsonable, indent=1))
    return 0


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    return repr(value)


def run_module(name: str, quick: bool, timeout: float) -> ModuleResult:
    """Run one module in a fresh interpreter; its :class:`ModuleResult`."""
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-run-") as tmp:
        results = Path(tmp) / "results.json"
        argv = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            name,
            "--results",
            str(results),
        ] + (["--quick"] if quick else [])
        env = dict(os.environ)
        env.setdefault("AWS_EC2_METADATA_DISABLED", "true")
        env.setdefault("NO_GCE_CHECK", "True")
        env.setdefault("MODELCACHE_PROGRESS", "0")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH", "")) if p)
        proc = subprocess.Popen(argv, env=env, cwd=ROOT, start_new_session=True)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            proc.wait()
            return ModuleResult(
                name,
                "error",
                error=f"timed out after {timeout:.0f} s",
                seconds=time.perf_counter() - began,
            )
        if not results.exists():
            return ModuleResult(
                name,
                "error",
                error=f"the process exited {code} with no result",
                seconds=time.perf_counter() - began,
            )
        data = json.loads(results.read_text())
    return ModuleResult(
        name,
        data["status"],
        data.get("title", ""),
        data.get("rows", []),
        data.get("error", ""),
        float(data.get("seconds", 0.0)),
    )


# -- formatting -------------------------------------------------------------------------------


def fmt(value: Any) -> str:
    """A table cell: numbers to 3 significant figures, booleans as yes/no, None as a dash."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return str(value)
        if value == 0:
            return "0"
        magnitude = abs(value)
        if magnitude >= 1000:
            return f"{value:,.0f}"
        digits = max(0, 2 - math.floor(math.log10(magnitude)))
        return f"{value:.{min(digits, 6)}f}"
    text = str(value).replace("|", "\\|").replace("\n", " ")
    return text


def met_mark(met: Any) -> str:
    """``True`` -> met, ``False`` -> not met, anything else -> not judged."""
    if met is True:
        return "✅ met"
    if met is False:
        return "❌ not met"
    return "— not judged"


def _figures(rows: Sequence[dict[str, Any]], module: str) -> dict[str, list[dict[str, Any]]]:
    figures: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        figures.setdefault(str(r.get("figure") or module), []).append(r)
    return figures


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text.lower()).strip("-")


def notes(rows: Sequence[dict[str, Any]]) -> list[str]:
    """A figure's notes, then what limits it, as markdown quotes (each text once)."""
    said = dict.fromkeys(str(r["note"]) for r in rows if r.get("note"))
    limits = dict.fromkeys(str(r["limits"]) for r in rows if r.get("limits"))
    return [f"> {note}" for note in said] + [
        f"> **What limits this figure:** {text}" for text in limits
    ]


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as markdown tables, one per figure, with their notes (a module run alone)."""
    parts: list[str] = []
    for figure, figure_rows in _figures(rows, "rows").items():
        title = figure_rows[0].get("title", figure)
        parts += [f"### {title}", "", table(figure_rows), ""]
        for line in notes(figure_rows):
            parts += [line, ""]
    return "\n".join(parts)


def table(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of ``rows``: name, median, spread, then every other key."""
    units = {r.get("unit") for r in rows if "median" in r}
    one_unit = next(iter(units)) if len(units) == 1 else None
    has_value = any("median" in r for r in rows)
    has_spread = any("low" in r and "high" in r for r in rows)
    extra: list[str] = []
    for r in rows:
        for key in r:
            if key not in META_KEYS and key != "name" and key not in extra:
                extra.append(key)
    header = ["name"]
    if has_value:
        header.append(f"median ({one_unit})" if one_unit else "median")
    if has_spread:
        header.append("min to max (rounds)")
    header += extra
    if any("met" in r for r in rows):
        header.append("goal")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [f"**{fmt(r.get('name'))}**"]
        if has_value:
            value = fmt(r.get("median"))
            if not one_unit and r.get("unit"):
                value += f" {r['unit']}"
            cells.append(value)
        if has_spread:
            if "low" in r and "high" in r:
                n = f" ({r['n']})" if "n" in r else ""
                cells.append(f"{fmt(r['low'])} to {fmt(r['high'])}{n}")
            else:
                cells.append("—")
        cells += [fmt(r.get(k)) for k in extra]
        if "goal" in header:
            cells.append(met_mark(r.get("met")) if "met" in r else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goals(rows: Sequence[dict[str, Any]]) -> list[tuple[str, Any]]:
    """``(goal, met)`` for each distinct goal among ``rows`` (met only when every row met it)."""
    found: dict[str, list[Any]] = {}
    for r in rows:
        if r.get("goal"):
            found.setdefault(str(r["goal"]), []).append(r.get("met"))
    out: list[tuple[str, Any]] = []
    for goal, marks in found.items():
        judged = [m for m in marks if isinstance(m, bool)]
        out.append((goal, all(judged) if judged else None))
    return out


def plot(figure: str, title: str, rows: Sequence[dict[str, Any]], path: Path) -> bool:
    """A horizontal bar chart of the rows' medians with min-max whiskers, one panel per unit."""
    points = [r for r in rows if isinstance(r.get("median"), (int, float))]
    if not points:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    by_unit: dict[str, list[dict[str, Any]]] = {}
    for r in points:
        by_unit.setdefault(str(r.get("unit") or ""), []).append(r)
    height = sum(0.45 * len(v) + 0.9 for v in by_unit.values()) + 0.4
    fig, axes = plt.subplots(len(by_unit), 1, figsize=(8, max(2.2, height)), squeeze=False)
    for ax, (unit, group) in zip(axes[:, 0], by_unit.items(), strict=True):
        names = [str(r.get("name")) for r in group]
        medians = [float(r["median"]) for r in group]
        low = [max(0.0, m - float(r.get("low", m))) for m, r in zip(medians, group, strict=True)]
        high = [max(0.0, float(r.get("high", m)) - m) for m, r in zip(medians, group, strict=True)]
        colors = [
            "#2e7d32"
            if r.get("met") is True
            else "#c62828"
            if r.get("met") is False
            else "#1565c0"
            if "modelcache" in str(r.get("name"))
            else "#78909c"
            for r in group
        ]
        y = list(range(len(group)))[::-1]
        ax.barh(y, medians, xerr=[low, high], color=colors, capsize=3, height=0.6)
        ax.set_yticks(y, names, fontsize=8)
        better = {str(r.get("better")) for r in group} - {"None"}
        hint = f" ({better.pop()} is better)" if len(better) == 1 else ""
        ax.set_xlabel(f"{unit}{hint}", fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="x", alpha=0.3)
        positive = [m for m in medians if m > 0]
        if positive and max(positive) / min(positive) > 100:
            ax.set_xscale("log")  # values orders of magnitude apart (a cache hit vs a re-hash)
        for yi, m, up in zip(y, medians, high, strict=True):
            ax.annotate(
                fmt(m),
                (m + up, yi),
                xytext=(4, 0),
                textcoords="offset points",
                va="center",
                fontsize=7,
            )
        ax.margins(x=0.12)
    axes[0, 0].set_title(textwrap.fill(title, 80), fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _git_commit() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}{' (with uncommitted changes)' if dirty.strip() else ''}" if sha else "unknown"


def report(
    results: Sequence[ModuleResult],
    *,
    quick: bool,
    info: dict[str, str],
    output: Path,
    seconds: float,
    commit: str,
) -> str:
    """The markdown of ``docs/benchmarks.md``; plots are written beside it under ``img/``.

    ``commit``: the tree measured, described when the run began (this replaces the plots,
    which are tracked files: described now, the tree would look changed)."""
    img_dir = output.parent / "img" / "benchmarks"
    if img_dir.exists():
        for old in img_dir.glob("*.png"):
            old.unlink()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out: list[str] = ["# Benchmarks", ""]
    if quick:
        out += [
            '!!! warning "Quick mode"',
            "    This report comes from `--quick`: small files and few rounds, to check that "
            "the harness works. Do not quote these numbers.",
            "",
        ]
    out += [
        "Every comparison below ran side by side in one run of `nox -s bench` "
        "(`python benchmarks/run.py`), on the machine described at the end; contenders "
        "alternate round by round and each figure shows the median of the rounds with their "
        "minimum and maximum. Claims are ratios of medians measured in the same run. Each "
        "figure states its goal (from the project's issues) and whether this run met it.",
        "",
        f"Run: {when}, commit {commit}, {seconds:.0f} s{' (quick mode)' if quick else ''}.",
        "",
    ]
    summary: list[tuple[str, str, str, Any]] = []
    body: list[str] = []
    for result in results:
        section = result.title or result.name
        body += [f"## {section}", ""]
        if result.status == "missing":
            body += [
                '!!! note "Not measured in this run"',
                f"    {result.error}; `run.py` skipped `{result.name}`.",
                "",
            ]
            continue
        if result.status == "error":
            body += [
                '!!! failure "This benchmark failed"',
                "",
                f"    `{result.name}` raised an error; the figures below (if any) are incomplete.",
                "",
                "    ```text",
            ]
            body += [f"    {line}" for line in result.error.strip().splitlines()]
            body += ["    ```", ""]
        for figure, rows in _figures(result.rows, result.name).items():
            title = next((str(r["title"]) for r in rows if r.get("title")), figure)
            anchor = _slug(f"{result.name.removeprefix('bench_')}-{figure}")
            body += [f"### {title} {{ #{anchor} }}", ""]
            for goal, met in goals(rows):
                body.append(f"- **Goal:** {fmt(goal)} — {met_mark(met)}")
                summary.append((title, anchor, goal, met))
            if goals(rows):
                body.append("")
            body += [table(rows), ""]
            image = img_dir / f"{anchor}.png"
            if plot(figure, title, rows, image):
                rel = image.relative_to(output.parent).as_posix()
                body += [f"![{fmt(title)}]({rel})", ""]
            for line in notes(rows):
                body += [line, ""]
        body.append(f"*`{result.name}` took {result.seconds:.0f} s.*")
        body.append("")
    if summary:
        out += ["## Goals at a glance", "", "| figure | goal | this run |", "|---|---|---|"]
        out += [f"| [{fmt(t)}](#{a}) | {fmt(g)} | {met_mark(m)} |" for t, a, g, m in summary]
        out.append("")
    skipped = [r.name for r in results if r.status != "ok"]
    if skipped:
        out += [f"Not measured or failed in this run: {', '.join(f'`{s}`' for s in skipped)}.", ""]
    out += body
    out += ["## The machine", "", "| | |", "|---|---|"]
    out += [f"| {k} | {fmt(v)} |" for k, v in info.items()]
    out += [
        "",
        "Reproduce with `nox -s bench` (or `python benchmarks/run.py`; `--quick` for the "
        "small run CI does). The code is in `benchmarks/`.",
        "",
    ]
    return "\n".join(out)


def _load_average() -> str:
    """The machine's load average (other users' work shares its cores with the benchmarks)."""
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


# -- command line -----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmarks and write the report; 1 if a module failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes and few rounds (CI); writes to build/ by default",
    )
    parser.add_argument(
        "--output",
        type=Path,
        help="the report (default docs/benchmarks.md; build/bench-quick/benchmarks.md if --quick)",
    )
    parser.add_argument("--only", help="comma-separated module names (default: all)")
    parser.add_argument("--timeout", type=float, help="seconds per module (3600; quick: 300)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--results", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return run_child(args.child, args.quick, args.results)
    output: Path = args.output or (
        ROOT / "build" / "bench-quick" / "benchmarks.md"
        if args.quick
        else ROOT / "docs" / "benchmarks.md"
    )
    names = [n.strip() for n in args.only.split(",")] if args.only else list(MODULES)
    timeout = args.timeout or (300.0 if args.quick else 3600.0)
    began = time.perf_counter()
    commit = _git_commit()
    info = machine()
    info["load average at the start (1, 5, 15 min)"] = _load_average()
    results: list[ModuleResult] = []
    for name in names:
        print(f"== {name}{' (quick)' if args.quick else ''}", file=sys.stderr, flush=True)
        result = run_module(name, args.quick, timeout)
        print(
            f"== {name}: {result.status}, {len(result.rows)} rows, {result.seconds:.1f} s",
            file=sys.stderr,
            flush=True,
        )
        results.append(result)
    info["load average at the end (1, 5, 15 min)"] = _load_average()
    output.parent.mkdir(parents=True, exist_ok=True)
    text = report(
        results,
        quick=args.quick,
        info=info,
        output=output,
        seconds=time.perf_counter() - began,
        commit=commit,
    )
    output.write_text(text)
    (output.parent / (output.stem + ".json")).write_text(
        json.dumps(
            {"machine": info, "quick": args.quick, "modules": [r.__dict__ for r in results]},
            indent=1,
            default=_jsonable,
        )
    )
    print(f"wrote {output}", file=sys.stderr)
    return 1 if any(r.status == "error" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
