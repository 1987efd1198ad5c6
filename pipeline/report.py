"""The results of a grid folder as tables and plots: one row per student x method x hyper-parameters.

Seeds are what a row averages over: mean and sample standard deviation (n-1; blank for one seed) of
the best and the last epoch's test accuracy, and the mean wall time of a run. Reads what the runs
wrote (config.json from the grid, result.json and metrics.jsonl from train_student); writes
results.md, results.csv, accuracy.png (per method, error bars: std over seeds) and curves.png
(test accuracy per epoch, mean over seeds) into the grid folder.
"""
import csv
import io
import json
import math
import statistics
from pathlib import Path

from kdcache.errors import UserError

COLUMNS = ["student", "method", "settings", "params", "seeds", "best_mean", "best_std", "last_mean", "last_std",
           "wall_seconds_mean", "epochs"]


def read_runs(grid_dir) -> list[dict]:
    """Every run of the grid folder (the ones its last `kdcache grid` listed in runs.json):
    {folder, label, student, seed, axes, result or None, metrics, error or None}."""
    grid_dir = Path(grid_dir)
    listing = grid_dir / "runs.json"
    if not listing.exists():
        raise UserError(f"{grid_dir} is not a grid folder (no runs.json): run `kdcache grid GRID.yaml` first")
    redo = "re-run `kdcache grid` to rewrite it"
    try:
        names = json.loads(listing.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the grid listing {listing} ({type(e).__name__}: {e}): {redo}") from None
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise UserError(f"cannot read the grid listing {listing} (not a list of run folders): {redo}")
    runs = []
    for name in names:
        folder = grid_dir / name
        result = folder / "result.json"
        error = folder / "error.txt"
        metrics = folder / "metrics.jsonl"
        try:
            info = json.loads((folder / "config.json").read_text())
            runs.append({"folder": str(folder), "label": info["label"], "student": info["student"],
                         "seed": info["seed"], "axes": info["axes"],
                         "result": json.loads(result.read_text()) if result.exists() else None,
                         "metrics": [json.loads(line) for line in metrics.read_text().splitlines()]
                         if metrics.exists() else [],
                         "error": error.read_text() if error.exists() else None})
        except (OSError, ValueError, KeyError, TypeError) as e:  # a run folder deleted or edited by hand
            raise UserError(f"cannot read run {name} of {grid_dir} ({type(e).__name__}: {e}): {redo}") from None
    return runs


def params_text(axes: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(axes.items()))


def settings_text(result: dict) -> str:
    """What a run really trained with: its method's parameters (defaults filled in) and how it got targets."""
    how = [] if result["mode"] == "offline" else [result["mode"]]
    if result.get("augment") == "fresh":
        how.append("fresh views")
    elif result.get("views_used") and result["mode"] != "no teacher (ce)":
        how.append(f"{result['views_used']} views/image")
    params = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in result["params"].items()
                       if not (k == "unbiased_std" and v is True or k == "standardize" and v is False))
    return "; ".join([params, *how])


def summarise(runs: list[dict]) -> list[dict]:
    """One row per (student, method label, swept parameters) over the finished runs, in grid order."""
    groups = {}
    for r in runs:
        if r["result"] is not None:
            groups.setdefault((r["student"], r["label"], params_text(r["axes"])), []).append(r)
    rows = []
    for (student, label, params), members in groups.items():
        best = [m["result"]["best_accuracy"] for m in members]
        last = [m["result"]["last_accuracy"] for m in members]
        rows.append({"student": student, "method": label, "params": params, "seeds": len(members),
                     "settings": settings_text(members[0]["result"]),
                     "teacher_accuracy": (members[0]["result"].get("teacher") or {}).get("test_accuracy"),
                     "best_mean": statistics.fmean(best), "best_std": _std(best),
                     "last_mean": statistics.fmean(last), "last_std": _std(last),
                     "wall_seconds_mean": statistics.fmean(m["result"]["wall_seconds"] for m in members),
                     "epochs": members[0]["result"]["epochs"], "runs": members})
    return rows


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else math.nan


def markdown_table(rows: list[dict], runs: list[dict]) -> str:
    """The table as Markdown (accuracy in %), followed by the failed and unfinished runs."""
    def pm(mean, std):
        return f"{100 * mean:.2f}" + ("" if math.isnan(std) else f" ± {100 * std:.2f}")

    lines = ["| student | method | hyper-parameters | seeds | best acc. (%) | last acc. (%) | wall time (s) |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['student']} | {r['method']} | {r['settings']} | {r['seeds']} | "
                     f"{pm(r['best_mean'], r['best_std'])} | {pm(r['last_mean'], r['last_std'])} | "
                     f"{r['wall_seconds_mean']:.1f} |")
    failed = [r for r in runs if r["error"]]
    pending = [r for r in runs if r["result"] is None and not r["error"]]
    if failed:
        lines += ["", f"Failed runs ({len(failed)}):"]
        lines += [f"- {r['label']} {r['student']} seed {r['seed']} {params_text(r['axes'])} ({r['folder']}): "
                  f"{r['error'].strip().splitlines()[-1]}" for r in failed]
    if pending:
        lines += ["", f"Unfinished runs ({len(pending)}): re-run the grid to finish them."]
    return "\n".join(lines) + "\n"


def cost_text(rows: list[dict]) -> str:
    """The measured saving: each online row against the offline row of the same method and parameters
    (mean wall time per run, evaluation included), and what the grid's offline runs would cost online."""
    def first(r):
        return r["runs"][0]["result"]

    lines, extras = [], []
    for on in (r for r in rows if first(r)["mode"] == "online"):
        same = [r for r in rows if first(r)["mode"] == "offline" and first(r)["method"] == first(on)["method"]
                and first(r)["params"] == first(on)["params"]]
        if same:
            off = max(same, key=lambda r: first(r).get("views_used") or 0)  # the one with all its views
            extras.append(on["wall_seconds_mean"] - off["wall_seconds_mean"])  # the live teacher's share
            lines.append(f"- {on['method']}: {on['wall_seconds_mean']:.1f} s per run; {off['method']} from the "
                         f"cache: {off['wall_seconds_mean']:.1f} s ({on['wall_seconds_mean'] / off['wall_seconds_mean']:.2f}x)")
    if not lines:
        return ""
    offline = [m["result"]["wall_seconds"] for r in rows for m in r["runs"] if m["result"]["mode"] == "offline"]
    online = sum(offline) + len(offline) * sum(extras) / len(extras)
    return ("Saving, measured (mean wall time per run, evaluation included):\n" + "\n".join(lines)
            + f"\n- the {len(offline)} offline runs took {sum(offline):.0f} s in all; with a live teacher they "
              f"would take about {online:.0f} s. The cache cost one teacher pass (stage 1) for all of them.\n")


def csv_table(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if isinstance(r[k], float) and math.isnan(r[k]) else r[k]) for k in COLUMNS})
    return buf.getvalue()


def plot(rows: list[dict], out: Path) -> list[Path]:
    """accuracy.png: last-epoch accuracy per method (bars, std error bars) with the CE-only run and the
    teacher as lines, so the axis need not start at 0 to be read honestly; one panel per student;
    curves.png: test accuracy per epoch, mean over seeds, one line per row."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    students = list(dict.fromkeys(r["student"] for r in rows))
    fig, axes = plt.subplots(1, len(students), figsize=(max(5, 1.0 * len(rows) / len(students) + 2) * len(students), 4),
                             squeeze=False)
    for ax, student in zip(axes[0], students):
        mine = [r for r in rows if r["student"] == student]
        names = [r["method"] + (f"\n{r['params']}" if r["params"] else "") for r in mine]
        err = [0 if math.isnan(r["last_std"]) else 100 * r["last_std"] for r in mine]
        ax.bar(range(len(mine)), [100 * r["last_mean"] for r in mine], yerr=err if any(err) else None,
               capsize=3, color="tab:blue")
        ax.set_xticks(range(len(mine)), names, rotation=45, ha="right", fontsize=8)
        levels = [100 * r["last_mean"] for r in mine]
        ce = [r for r in mine if r["runs"][0]["result"]["method"] == "ce"]
        if ce:
            ax.axhline(100 * ce[0]["last_mean"], color="tab:gray", ls="--", label=f"CE only ({ce[0]['method']})")
            levels.append(100 * ce[0]["last_mean"])
        teacher = next((r["teacher_accuracy"] for r in mine if r["teacher_accuracy"]), None)
        if teacher:
            ax.axhline(100 * teacher, color="tab:red", ls=":", label="teacher")
            levels.append(100 * teacher)
        if ce or teacher:
            ax.legend(fontsize=8, loc="lower right")
        ax.set_ylim(max(0, min(levels) - 5), min(100, max(levels) + 2))
        ax.set_ylabel("last-epoch test accuracy (%)")
        ax.set_title(f"{student} (mean ± std over seeds)")
    fig.tight_layout()
    files = [out / "accuracy.png"]
    fig.savefig(files[0], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(students), figsize=(6 * len(students), 4), squeeze=False)
    for ax, student in zip(axes[0], students):
        for r in (r for r in rows if r["student"] == student):
            curves = [[m["test_accuracy"] for m in run["metrics"]] for run in r["runs"]]
            n = min(len(c) for c in curves)
            mean = [100 * statistics.fmean(c[e] for c in curves) for e in range(n)]
            ax.plot(range(1, n + 1), mean, marker="o", ms=3,
                    label=r["method"] + (f" ({r['params']})" if r["params"] else ""))
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{student}: training curves (mean over seeds)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    files.append(out / "curves.png")
    fig.savefig(files[1], dpi=120)
    plt.close(fig)
    return files


def write_report(grid_dir, *, plots: bool = True) -> dict:
    """Write results.md, results.csv and the plots into the grid folder; returns {markdown, rows, files}."""
    grid_dir = Path(grid_dir)
    runs = read_runs(grid_dir)
    rows = summarise(runs)
    text = markdown_table(rows, runs)
    saving = cost_text(rows)
    text += "\n" + saving if saving else ""
    (grid_dir / "results.md").write_text(text)
    (grid_dir / "results.csv").write_text(csv_table(rows))
    files = [grid_dir / "results.md", grid_dir / "results.csv"]
    if plots and rows:
        files += plot(rows, grid_dir)
    return {"markdown": text, "rows": rows, "files": files}
