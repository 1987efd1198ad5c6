"""Train a student from a kdcache store with a plain PyTorch loop (docs/API.md explains each piece).

    python examples/own_loop.py --cache STORE [--steps N] [--method kd] [--workers 2]

With the same seed, batch size, lr and chunks per block it takes the very steps of
`kdcache train` with train.memory_gb: 0, train.schedule: constant (tests/test_dataset.py checks the losses).
"""
import argparse
import itertools

import torch
from torch.utils.data import DataLoader

import kdcache
from kdcache.models import build_model  # or any nn.Module of your own

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--cache", required=True, help="store path or URL")
p.add_argument("--method", default="kd", help="ce, kd, ttm, wttm, dkd, mlt (published settings)")
p.add_argument("--student", default="fmnist_cnn")
p.add_argument("--steps", type=int, default=100)
p.add_argument("--batch-size", type=int, default=32)
p.add_argument("--lr", type=float, default=0.05)
p.add_argument("--workers", type=int, default=0)
p.add_argument("--chunks-per-block", type=int, default=16)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--device", default="cpu")
args = p.parse_args()

loss_fn = kdcache.Loss(args.method)
# Replayed views, labels, teacher logits and the statistics the method reads; stores larger than memory are
# read in whole chunks, in blocks of chunks shuffled by the sampler.
ds = kdcache.CacheDataset(args.cache, method=args.method, seed=args.seed, cache_chunks=args.chunks_per_block)
sampler = kdcache.ChunkSampler(ds, seed=args.seed)
loader = DataLoader(ds, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers)

torch.manual_seed(args.seed)
cache = ds.cache
student = build_model(args.student, cache.num_classes, ds.data.channels, image_size=cache.space.output_size[0])
student = student.to(args.device).train()
opt = torch.optim.SGD(student.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)

step = 0
for epoch in itertools.count():
    ds.set_epoch(epoch)  # one cached view per sample, a new one each epoch
    sampler.set_epoch(epoch)
    for batch in loader:
        batch = {k: v.to(args.device) for k, v in batch.items()}
        loss = loss_fn(student(batch["image"]), batch["logits"], batch["label"], stats=batch, epoch=epoch + 1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        print(f"epoch {epoch} step {step} loss {loss.item()!r}", flush=True)
        if step == args.steps:
            raise SystemExit(0)
