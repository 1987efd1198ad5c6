"""The views experiment's table and plot (docs/RESULTS.md): test accuracy against cached views per image.

Reads the grid folders ROOT/crop_flip, ROOT/resized and ROOT/resized-cropflip-teacher (`make views-experiment`), writes ROOT/views.md
(one row per arm: last-epoch test accuracy and train accuracy, mean ± std over seeds, and the train-test
gap) and ROOT/views.png (offline KD against K, online KD and CE with fresh augmentation as bands).

    .venv/bin/python benchmarks/views_report.py results/views
"""
import argparse
import re
import statistics
from pathlib import Path

from kdcache.report import read_runs, summarise

SPACES = {"crop_flip": "crop/flip, padding 2 (50 views)",
          "resized": "random-resized crop/flip (16 sampled views), teacher trained on them",
          "resized-cropflip-teacher": "random-resized crop/flip, teacher trained on crop/flip views"}


def stats(values):
    values = [100 * v for v in values]
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else float("nan")


def rows_of(folder: Path) -> list[dict]:
    out = []
    for r in summarise(read_runs(folder)):
        res = [m["result"] for m in r["runs"]]
        test = stats([x["last_accuracy"] for x in res])
        train = stats([m["metrics"][-1]["train_accuracy"] for m in r["runs"]])
        out.append({"arm": r["method"], "seeds": r["seeds"], "test": test, "train": train,
                    "gap": train[0] - test[0], "views_used": res[0]["views_used"], "augment": res[0]["augment"],
                    "mode": res[0]["mode"], "epochs": res[0]["epochs"], "wall": r["wall_seconds_mean"]})
    return out


def table(space: str, rows: list[dict]) -> str:
    lines = [f"**{SPACES[space]}**", "",
             "| arm | targets | views per image | seeds | test acc. % (last epoch) | train acc. % | train - test |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        views = "fresh every step" if r["augment"] == "fresh" else str(r["views_used"])
        lines.append(f"| {r['arm']} | {r['mode']} | {views} | {r['seeds']} | {r['test'][0]:.2f} ± {r['test'][1]:.2f} "
                     f"| {r['train'][0]:.2f} ± {r['train'][1]:.2f} | {r['gap']:+.2f} |")
    return "\n".join(lines) + "\n"


def plot(all_rows: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(all_rows), figsize=(6 * len(all_rows), 4.2), squeeze=False)
    for ax, (space, rows) in zip(axes[0], all_rows.items()):
        kd = sorted((r for r in rows if re.fullmatch(r"kd_(K\d+|all)", r["arm"])), key=lambda r: r["views_used"])
        for name, color in (("ce_fresh", "tab:gray"), ("kd_online_fresh", "tab:green")):
            band = next((r for r in rows if r["arm"] == name), None)
            if band:
                m, s = band["test"]
                ax.axhspan(m - s, m + s, color=color, alpha=0.25)
                ax.axhline(m, color=color, label=f"{name.replace('_', ' ')} (mean ± std)")
        if kd:
            ax.errorbar([r["views_used"] for r in kd], [r["test"][0] for r in kd], yerr=[r["test"][1] for r in kd],
                        marker="o", capsize=3, color="tab:blue", label="offline KD, K cached views")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("cached views per image (K)")
        ax.set_ylabel("test accuracy, last epoch (%)")
        ax.set_title(SPACES[space], fontsize=10)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path)
    args = ap.parse_args()
    all_rows = {s: rows_of(args.root / s) for s in SPACES if (args.root / s / "runs.json").exists()}
    text = "\n".join(table(s, r) for s, r in all_rows.items())
    (args.root / "views.md").write_text(text)
    plot(all_rows, args.root / "views.png")
    print(text)


if __name__ == "__main__":
    main()
