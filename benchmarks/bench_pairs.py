"""What the cache saves: per-step time of CE-only, offline KD and online KD on the published pairs, and
stage 1's cost per cached view, side by side in one run; then the cost model and the break-even runs.

Pairs: the default Fashion-MNIST pair (28x28x1, 10 classes, batch 128), the four CIFAR-100 pairs of
the KD literature (32x32x3, 100 classes, batch 64) and an ImageNet-style pair (torchvision ResNet-50 ->
ResNet-18, 224x224x3, 1000 classes, batch 16); random input tensors (only time is measured), the
models in training mode on `--device`. One training step: student forward, loss, backward, SGD update;
offline KD adds its cached targets (float16 rows gathered from an in-memory array, as the trainer does)
and the KD loss; online KD adds the teacher's forward pass (eval mode, no gradient). The three modes of
a pair run back to back `--repeats` times, and ratios are medians of per-round ratios. Stage 1's cost
per cached view: the teacher's forward pass alone (eval, no gradient) at the pair's training batch
(`kdcache cache-teacher --batch-size B`; on this CPU stage 1's default batch of 512 costs about 1.8x
more per image, docs/BENCHMARKS.md).

Cost model (per image of the data set; f = stage-1 seconds per view, s = seconds per image-step):
  caching V views          V * f                          (once; V teacher forwards per image)
  one offline run, E epochs E * s_offline
  one online run,  E epochs E * s_online                  (E teacher forwards per image)
  break-even runs R* = V * f / (E * (s_online - s_offline)): from R* runs on, the cache is cheaper.

    .venv/bin/python benchmarks/bench_pairs.py [--seconds 3] [--repeats 3] [--device cpu]
"""
import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kdcache.methods import distill_loss
from kdcache.models import build_model, select_device

# name: (teacher, student, classes, channels, side, batch, cache schedule: views V, epochs E)
PAIRS = {
    "fmnist_resnet -> fmnist_cnn": ("fmnist_resnet", "fmnist_cnn", 10, 1, 28, 128, 50, 20),
    "resnet32x4 -> resnet8x4": ("resnet32x4", "resnet8x4", 100, 3, 32, 64, 162, 240),
    "wrn_40_2 -> wrn_16_2": ("wrn_40_2", "wrn_16_2", 100, 3, 32, 64, 162, 240),
    "resnet56 -> resnet20": ("resnet56", "resnet20", 100, 3, 32, 64, 162, 240),
    "vgg13 -> vgg8": ("vgg13", "vgg8", 100, 3, 32, 64, 162, 240),
    # ImageNet-style: torchvision models at 224x224, 1000 classes, K = 50 sampled views, 100 epochs
    "tv:resnet50 -> tv:resnet18": ("tv:resnet50", "tv:resnet18", 1000, 3, 224, 16, 50, 100),
}
MODES = ("ce", "offline_kd", "online_kd")


def step_seconds(teacher, student, opt, mode, x, y, bank, seconds) -> float:
    """Mean wall seconds of a training step of `mode`: steps are timed (after 2 untimed warm-up steps) until
    `seconds` have passed and at least 3 ran, so that short steps are averaged over many."""
    rows = torch.arange(len(x))
    i = timed = 0
    start = time.perf_counter()  # restarted after the warm-up steps
    while timed < 3 or time.perf_counter() - start < seconds:
        if i == 2:
            start = time.perf_counter()
        z_s = student(x)
        loss = F.cross_entropy(z_s, y)
        if mode != "ce":
            if mode == "online_kd":
                with torch.no_grad():
                    z_t = teacher(x)
            else:  # the cached rows of this batch, float16 -> float32, as MemoryTargets hands them over
                z_t = torch.from_numpy(bank[(rows + i * len(x)) % len(bank)].astype(np.float32)).to(x.device)
            loss = 0.1 * loss + 0.9 * distill_loss("kd", z_s, z_t, y, params={"T": 4.0}, epoch=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if x.is_cuda:
            torch.cuda.synchronize()
        timed += i >= 2
        i += 1
    return (time.perf_counter() - start) / timed


def cache_seconds_per_view(teacher, n, channels, side, device, batches) -> float:
    x = torch.randn(n, channels, side, side, device=device)
    with torch.no_grad():
        teacher(x)
        start = time.perf_counter()
        for _ in range(batches):
            teacher(x).float().cpu()
    return (time.perf_counter() - start) / (batches * n)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="time each mode and round for this long (>= 3 steps)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of the three modes, interleaved")
    ap.add_argument("--cache-batches", type=int, default=10, help="timed stage-1 batches per pair and round")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="benchmarks/results/pairs.json")
    args = ap.parse_args()
    device = select_device(args.device)
    torch.manual_seed(0)
    results = {}
    for name, (t_name, s_name, K, C, S, B, V, E) in PAIRS.items():
        teacher = build_model(t_name, K, C, image_size=S).to(device).eval()
        student = build_model(s_name, K, C, image_size=S).to(device).train()
        opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
        x, y = torch.randn(B, C, S, S, device=device), torch.randint(0, K, (B,), device=device)
        bank = np.random.default_rng(0).normal(0, 3, (8 * B, K)).astype(np.float16)
        per = {m: [] for m in MODES}
        cache = []
        for r in range(args.repeats):
            for mode in MODES:
                per[mode].append(step_seconds(teacher, student, opt, mode, x, y, bank, args.seconds))
            cache.append(cache_seconds_per_view(teacher, B, C, S, device, args.cache_batches))
            print(f"{name} round {r + 1}: " + ", ".join(f"{m} {1000 * per[m][-1]:.1f} ms/step" for m in MODES)
                  + f"; stage 1 {1e6 * cache[-1]:.0f} us/view", flush=True)
        s = {m: statistics.median(v) / B for m, v in per.items()}  # seconds per image-step
        f = statistics.median(cache)
        ratio = {f"{a}/{b}": statistics.median(p / q for p, q in zip(per[a], per[b]))
                 for a, b in (("online_kd", "offline_kd"), ("offline_kd", "ce"), ("online_kd", "ce"))}
        results[name] = {
            "teacher": t_name, "student": s_name, "classes": K, "input": [C, S, S], "batch": B,
            "ms_per_step": {m: 1000 * statistics.median(v) for m, v in per.items()}, "ratios": ratio,
            "stage1_us_per_view": 1e6 * f, "online_teacher_us_per_image": 1e6 * (s["online_kd"] - s["offline_kd"]),
            "schedule": {"views": V, "epochs": E},
            "break_even_runs": V * f / (E * (s["online_kd"] - s["offline_kd"])),
            "break_even_runs_in_forwards": V / E,
        }
        print(f"{name}: online/offline {ratio['online_kd/offline_kd']:.2f}, offline/CE {ratio['offline_kd/ce']:.2f}, "
              f"break-even after {results[name]['break_even_runs']:.2f} runs (V={V}, E={E})", flush=True)
    meta = {"device": str(device), "torch_threads": torch.get_num_threads(), "seconds": args.seconds,
            "repeats": args.repeats, "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "pairs": results}, indent=1))
    plot(results, Path(args.out).with_suffix(".png"))
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.png')}")


def plot(results: dict, path: Path, runs: int = 10) -> None:
    """Total cost per training image against the number of student runs: online KD vs cache + offline KD."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(3.2 * len(results), 3.4), squeeze=False)
    r = np.arange(0, runs + 1)
    for ax, (name, p) in zip(axes[0], results.items()):
        V, E = p["schedule"]["views"], p["schedule"]["epochs"]
        B = p["batch"]
        on, off = p["ms_per_step"]["online_kd"] / 1000 / B, p["ms_per_step"]["offline_kd"] / 1000 / B
        cache = V * p["stage1_us_per_view"] / 1e6
        ax.plot(r, 1000 * r * E * on, label="online KD", color="tab:red")
        ax.plot(r, 1000 * (cache + r * E * off), label="cache V views + offline KD", color="tab:blue")
        ax.set_title(f"{name}\nV = {V} views, {E} epochs", fontsize=8)
        ax.set_xlabel("student runs")
        ax.set_ylim(bottom=0)
    axes[0][0].set_ylabel("ms of compute per training image")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
