"""A stage-3 run folder (`train.out`): metrics.jsonl (one line per epoch), checkpoint.pt (resume state, tensors and
plain types only), student.pt (the final student, a kdcache.models checkpoint), result.json (written last: the run
is finished). A killed run resumes from its last epoch checkpoint; the checkpoint records the config and the
store fingerprint, so a folder is never resumed by another run.
"""
import json
from pathlib import Path

import torch

from kdcache.errors import UserError, first_difference
from kdcache.files import disk_full, torch_bytes, write_atomic
from kdcache.sharing import enclosing_store

RUN_FORMAT = "kdcache-train-run-1"


def run_config(cfg: dict) -> dict:
    """The config that defines a run's result (the device may change between a run and its resume)."""
    return {k: v for k, v in cfg.items() if k != "device"}


def resume(out: Path, student, opt, cfg: dict, fingerprint):
    """Load the run folder's checkpoint into student and optimiser; returns (metrics, wall seconds, epochs done)."""
    path = out / "checkpoint.pt"
    if not path.exists():
        return [], 0.0, 0
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file means the same thing to the user
        raise UserError(f"cannot read the run checkpoint {path} ({type(e).__name__}); "
                        "delete it to start over") from None
    if not isinstance(state, dict) or state.get("format") != RUN_FORMAT:
        raise UserError(f"{path} is not a kdcache training checkpoint; use another train.out")
    diff = first_difference(json.loads(state["config"]), json.loads(json.dumps(run_config(cfg))))
    if diff:
        raise UserError(f"run folder {out} holds a run with another config ({diff}); "
                        "use another train.out (--out) or delete the folder")
    if state["store_fingerprint"] != fingerprint:
        raise UserError(f"run folder {out} was trained from a store with another fingerprint; the store changed "
                        "since: use another train.out (--out) or delete the folder")
    student.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    return list(state["metrics"]), float(state["wall_seconds"]), int(state["epoch"])


def make_run_folder(location) -> Path:
    """The run folder, created: a local folder that is neither a Zarr store nor inside one (a run written
    there would add strays that `kdcache info` lists and `verify` misses)."""
    if "://" in str(location) or "::" in str(location):
        raise UserError(f"train.out must be a local folder path, got the URL {location}")
    out = Path(location)
    store = enclosing_store(out, itself=True)
    if store is not None:
        raise UserError(f"the run folder {out} would be inside the Zarr store {store}: choose a train.out (--out) "
                        "outside any store")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write the run folder {out}: {e.strerror} ({e.filename})") from None
    return out


def save_run(out: Path, *, epoch: int, cfg: dict, fingerprint, student, opt, metrics: list, wall: float) -> None:
    """The checkpoint of `epoch` epochs done (atomic) and the metrics file it implies (rewritten whole, so they
    always agree). A full disk keeps the previous epoch's checkpoint (or this one's when only the metrics failed)."""
    state = {"format": RUN_FORMAT, "epoch": epoch, "config": json.dumps(run_config(cfg)),
             "store_fingerprint": fingerprint, "model": student.state_dict(), "optimizer": opt.state_dict(),
             "metrics": metrics, "wall_seconds": wall}
    kept = epoch - 1
    with disk_full(out, lambda: f"the run folder keeps its checkpoint of epoch {kept}" if kept else
                   "no epoch was saved"):
        write_atomic(out / "checkpoint.pt", torch_bytes(state))
        kept += 1
        write_metrics(out, metrics)


def save_result(out: Path, metrics: list, result: dict) -> None:
    """The metrics again (a run killed between checkpoint and metrics file resumes here), then result.json, whose
    presence marks the run finished."""
    with disk_full(out, f"the run folder keeps its checkpoint of epoch {metrics[-1]['epoch']}; no result.json, "
                        "so the run is not marked finished"):
        write_metrics(out, metrics)
        write_atomic(out / "result.json", json.dumps(result, indent=1))


def write_metrics(out: Path, metrics: list) -> None:
    write_atomic(out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics))
