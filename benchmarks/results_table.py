"""Collect stage-3 runs into a markdown table: mean and std over seeds of the test accuracy per method.

Expects ROOT/<name>/<seed folder>/result.json (as written by `kdcache train --out ...`); <name> is the
row label. Reports the LAST epoch's accuracy (and, for reference, the best epoch's).

    .venv/bin/python benchmarks/results_table.py runs/results/fashion-mnist
"""
import argparse
import json
import statistics
from pathlib import Path


def mean_std(values):
    """'mean +- std' in percent; std is the sample std (n - 1)."""
    values = [100 * v for v in values]
    std = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):.2f} ± {std:.2f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path)
    args = ap.parse_args()
    rows = []
    for folder in sorted(p for p in args.root.iterdir() if p.is_dir()):
        results = [json.loads(f.read_text()) for f in sorted(folder.glob("*/result.json"))]
        if not results:
            continue
        r = results[0]
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items())
        rows.append(f"| {folder.name} | {r['method']} | {r['mode']} | {params} | {len(results)} "
                    f"({', '.join(str(x['seed']) for x in results)}) | {r['epochs']} "
                    f"| **{mean_std([x['last_accuracy'] for x in results])}** "
                    f"| {mean_std([x['best_accuracy'] for x in results])} "
                    f"| {statistics.mean(x['wall_seconds'] for x in results) / 60:.1f} |")
    print("| run | method | mode | parameters | seeds | epochs | last-epoch test acc. % (mean ± std) "
          "| best-epoch test acc. % | wall min/run |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
