"""The `kdcache` command: one sub-command per stage, each a thin call of its stage module.

Layers, later ones winning: defaults, the YAML config (--config), its `--set KEY=VALUE` items, the command's
own options. User mistakes and damaged stores end in one line
`Error: ...` and exit 1.
"""
import logging

import click

from kdcache.config import load_config
from kdcache.errors import UserError


class Commands(click.Group):
    """Turns UserError, and zarr's errors on a damaged store, into click's one-line error instead of a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            raise last_line(str(e)) from None
        except Exception as e:
            message = too_big(e) or store_damage(e)
            if message is None:
                raise
            raise last_line(message) from None


def too_big(e: Exception) -> str | None:
    """The one-line meaning of a size no up-front check caught: numpy refuses it before touching memory
    (MemoryError, or a ValueError for sizes beyond any array such as 2**63 samples)."""
    if isinstance(e, MemoryError) or isinstance(e, ValueError) and str(e).startswith(TOO_BIG):
        return (f"the request does not fit in memory ({str(e).strip() or 'MemoryError'}): lower the sizes in the "
                "config (data set, views, chunks, batches)")
    return None


TOO_BIG = ("Maximum allowed dimension exceeded", "array is too big")


def last_line(message: str) -> click.ClickException:
    """The error line, which must be the last thing printed: asyncio would otherwise log 'Task was destroyed
    but it is pending!' after it when zarr reads cut short by the error are collected at exit."""
    logging.getLogger("asyncio").disabled = True
    return click.ClickException(printable(message))


def printable(text: str) -> str:
    """One line whatever the message quotes: control characters of a user's value (a path holding a newline or
    a record separator) written as escapes."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def store_damage(e: Exception) -> str | None:
    """The one-line meaning of an error zarr raises on a damaged store outside the store layer's reads, else None.

    The store layer raises StoreDamage (a UserError, printed as it is) for damaged bytes, metadata and values,
    naming the store, the array and the rows (pipeline/store.py: `reading`, `reading_metadata`, `check_rows`).
    What is left is recognised by type, never by zarr's message text: a zarr.json that is not JSON, parsed where
    no store-layer read is involved (listing a group's members, say).
    """
    import json
    if isinstance(e, json.JSONDecodeError):
        return (f"a zarr.json of the cache store is not valid JSON ({e}): the store's metadata is damaged; "
                "run `kdcache verify STORE` to name the damaged object")
    return None


config_option = click.option("--config", "config_path", type=click.Path(dir_okay=False),
                             help="YAML config (defaults: the Fashion-MNIST pipeline; see configs/).")
device_option = click.option("--device", help="auto | cpu | cuda | cuda:N (overrides `device`).")
set_option = click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                          help="Override one config key after --config, checked like the file (repeatable): dotted "
                               "KEY, YAML VALUE, e.g. --set train.lr=0.1 --set views.views=16; the "
                               "command's own options win over it.")


def with_config(command):
    """--config and --set: every command that reads a config takes both."""
    return config_option(set_option(command))


@click.group(cls=Commands)
@click.version_option(package_name="kdcache")
def cli():
    """Offline teacher-logit cache for knowledge distillation: run the teacher once, distil many students."""
    show_warnings()


@cli.command("train-teacher")
@with_config
@device_option
@click.option("--checkpoint", help="Where to save the teacher (overrides teacher.checkpoint).")
@click.option("--epochs", type=click.IntRange(min=1), help="Training epochs (overrides teacher.epochs).")
def train_teacher_cmd(config_path, sets, device, checkpoint, epochs):
    """Stage 0: train the config's teacher with cross-entropy and save it with its test accuracy.

    A bootstrap for users without a teacher checkpoint; stage 1 takes any checkpoint of the zoo.
    """
    from kdcache.stages.train_teacher import train_teacher
    cfg = load_config(config_path, {"device": device, "teacher": {"checkpoint": checkpoint, "epochs": epochs}},
                      sets=sets)
    acc = train_teacher(cfg)
    click.echo(f"teacher {cfg['teacher']['arch']}: test accuracy {acc:.4f}; saved to {cfg['teacher']['checkpoint']}")


@cli.command("cache-teacher")
@with_config
@device_option
@click.option("--out", help="Cache store to write, a path or URL (s3://, gs://, file://; overrides cache.store).")
@click.option("--checkpoint", help="Teacher checkpoint (overrides teacher.checkpoint).")
@click.option("--batch-size", type=click.IntRange(min=1), help="Teacher batch in images (overrides cache.batch_size).")
@click.option("--num-shards", type=click.IntRange(min=1),
              help="Number of processes sharing the work (default: torchrun's WORLD_SIZE, else 1).")
@click.option("--shard-index", type=click.IntRange(min=0),
              help="This process's index in 0..num-shards-1 (default: torchrun's RANK, else 0).")
@click.option("--overwrite", is_flag=True, help="Replace an existing store built from a different manifest.")
def cache_teacher_cmd(config_path, sets, device, out, checkpoint, batch_size, num_shards, shard_index, overwrite):
    """Stage 1: run the teacher once over data set x views and write the logits to a Zarr store.

    Resumable: an interrupted run skips the shards it already finished. Several processes may share
    one store (--num-shards/--shard-index, or torchrun); each writes only its own shards.
    """
    from kdcache.stages.cache_teacher import cache_teacher, shards_from_env
    cfg = load_config(config_path, {"device": device, "cache": {"store": out, "batch_size": batch_size},
                                    "teacher": {"checkpoint": checkpoint}}, sets=sets)
    n, i = shards_from_env(num_shards, shard_index)
    store = cache_teacher(cfg, num_shards=n, shard_index=i, overwrite=overwrite)
    done = int(store.done().sum())
    click.echo(f"{store.path}: {done}/{store.num_shards} shards done, status {store.status}; "
               f"{store.describe_logits()}")


@cli.command("config")
@with_config
@click.argument("key", required=False)
def config_cmd(config_path, sets, key):
    """Print the resolved config (defaults <- FILE <- --set items) as YAML, or the value of one dotted KEY."""
    import yaml
    cfg = load_config(config_path, sets=sets)
    if key:
        for part in key.split("."):
            if not isinstance(cfg, dict) or part not in cfg:
                raise UserError(f"no config key '{key}'")
            cfg = cfg[part]
    click.echo(cfg if key and not isinstance(cfg, dict) else yaml.safe_dump(cfg, sort_keys=False).rstrip())


@cli.command("stats")
@click.argument("store", required=False)
@with_config
@click.option("--stat", "statistics", multiple=True,
              help="A statistic to compute (repeatable; names: pipeline/stats.py; default: stats.statistics = all).")
@click.option("--t-base", type=float, help="LS base temperature T_base (overrides stats.t_base).")
@click.option("--gamma", "gammas", type=float, multiple=True, help="WTTM gamma (repeatable; overrides stats.gammas).")
@click.option("--std", type=click.Choice(["unbiased", "population"]),
              help="std convention: unbiased (K-1, the LS code; default) or population (K).")
@click.option("--ece-bins", type=int, help="Calibration bins (overrides stats.ece_bins).")
@click.option("--scheduler", help="Address of a running dask.distributed scheduler (its workers must see STORE).")
@click.option("--workers", type=int, help="Start a local dask.distributed cluster of N worker processes.")
@click.option("--plot", "plot_dir", type=click.Path(file_okay=False), help="Also write PNG plots into this folder.")
@click.option("--out", help="Write the statistics into this overlay store (path or URL) instead of STORE: for stores "
                            "you cannot or should not write; train with --stats OUT (overrides cache.stats).")
def stats_cmd(store, config_path, sets, statistics, t_base, gammas, std, ece_bins, scheduler, workers, plot_dir, out):
    """Stage 2: per-(sample, view) temperatures and statistics of the cached logits, with Dask.

    Writes into STORE's stats/ group (default STORE: the config's cache.store; a path or a URL such as
    s3://bucket/x.zarr or http://host/x.zarr), or with --out into a separate overlay store tied to STORE
    by its fingerprint (needed for read-only stores). Statistics already computed with the same
    parameters from the same logits are kept; stale ones are recomputed. A second writer is refused.
    """
    from kdcache.stages.compute_stats import compute_stats, plot_stats
    cfg = load_config(config_path, {"cache": {"store": store, "stats": out}, "stats": {
        "statistics": list(statistics) or None, "t_base": t_base, "gammas": list(gammas) or None, "std": std,
        "ece_bins": ece_bins, "scheduler": scheduler, "workers": workers}}, sets=sets)
    s = cfg["stats"]
    if scheduler or workers:  # one on the command line replaces the other from the config
        s["scheduler"], s["workers"] = scheduler, workers
    overlay = cfg["cache"]["stats"]
    done = compute_stats(cfg["cache"]["store"], s, out=overlay, scheduler=s["scheduler"], workers=s["workers"])
    click.echo(f"{done['store']}" + (f" -> overlay {overlay}" if overlay else "")
               + f": computed {len(done['computed'])} statistics arrays"
               + (f" ({len(done['stale'])} stale ones recomputed)" if done["stale"] else "")
               + f", {len(done['up_to_date'])} already up to date")
    if plot_dir:
        files = plot_stats(cfg["cache"]["store"], s, plot_dir, overlay=overlay)
        click.echo(f"wrote {len(files)} plots to {plot_dir}")


@cli.command("train")
@with_config
@device_option
@click.option("--cache", "store", help="Cache store (path or URL) to read the targets from (overrides cache.store).")
@click.option("--stats", "overlay", help="Statistics overlay written by `kdcache stats STORE --out OVERLAY` "
                                         "(overrides cache.stats; default: the store's own statistics).")
@click.option("--online", is_flag=True, default=None,
              help="Run the teacher live instead of reading the cache (sets train.online).")
@click.option("--augment", type=click.Choice(["cached", "fresh"]),
              help="cached: one of the cached views per sample and epoch; fresh: a new view every step, as "
                   "ordinary training (CE and --online only) (sets train.augment).")
@click.option("--views-used", type=click.IntRange(min=1),
              help="Use a fixed subset of K of the cached views per sample (sets train.views_used).")
@click.option("--out", help="Run folder (overrides train.out); an existing run there is resumed.")
@click.option("--seed", type=click.IntRange(min=0), help="Seed of the student's init, views and order (overrides seed).")
@click.option("--epochs", type=click.IntRange(min=1), help="Training epochs (overrides train.epochs).")
@click.option("--workers", type=click.IntRange(min=0),
              help="DataLoader processes decoding images and replaying views; 0: in process (sets train.workers).")
def train_cmd(config_path, sets, device, store, overlay, online, augment, views_used, out, seed, epochs, workers):
    """Stage 3: train the config's student with its distillation method against the cached targets.

    Writes metrics.jsonl (per epoch), checkpoint.pt, student.pt and result.json into the run folder;
    a run killed part-way and started again resumes from its last finished epoch.
    """
    from kdcache.stages.train_student import train_student
    cfg = load_config(config_path, {"device": device, "seed": seed, "cache": {"store": store, "stats": overlay},
                                    "train": {"online": online, "augment": augment, "views_used": views_used,
                                              "out": out, "epochs": epochs, "workers": workers}}, sets=sets)
    r = train_student(cfg)
    click.echo(f"{r['method']} ({r['mode']}, {r['student']}): last test accuracy {r['last_accuracy']:.4f}, "
               f"best {r['best_accuracy']:.4f} (epoch {r['best_epoch']}); {cfg['train']['out']}/result.json")


@cli.command("grid")
@click.argument("grid_file", type=click.Path(dir_okay=False))
@click.option("--workers", type=click.IntRange(min=1),
              help="Worker processes of the local dask cluster (default: one per core, at most one per run).")
@click.option("--scheduler", help="Address of a running dask.distributed scheduler: run on its workers instead "
                                  "(they must see the store and the grid folder at the same paths).")
@set_option
def grid_cmd(grid_file, workers, scheduler, sets):
    """Stage 3 many times: every run of GRID_FILE (methods x students x hyper-parameters x seeds) on dask.

    Finished runs are skipped and interrupted ones resume from their checkpoints; a failing run is
    reported and the others go on. Ends by writing the report (kdcache report) and printing its table.
    """
    from kdcache.report import write_report
    from kdcache.stages.grid import run_grid
    if workers and scheduler:
        raise UserError("give --workers (a local cluster) or --scheduler (an existing one), not both")
    done = run_grid(grid_file, sets=sets, workers=workers, scheduler=scheduler)
    report = write_report(done["out"])
    click.echo(report["markdown"])
    click.echo(f"{done['done']} runs trained, {done['skipped']} already finished, {len(done['failed'])} failed; "
               f"report: {', '.join(str(f) for f in report['files'])}")
    if done["failed"]:
        raise SystemExit(1)


@cli.command("report")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--no-plots", is_flag=True, help="Write only the Markdown and CSV tables.")
def report_cmd(run_dir, no_plots):
    """Tables (results.md, results.csv) and plots (accuracy.png, curves.png) of a grid folder.

    One row per student x method x hyper-parameters: mean and std over seeds of the best and last
    epoch test accuracy, and the mean wall time per run.
    """
    from kdcache.report import write_report
    report = write_report(run_dir, plots=not no_plots)
    click.echo(report["markdown"])
    click.echo(f"wrote {', '.join(str(f) for f in report['files'])}")


@cli.command("info")
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def info_cmd(store, as_json):
    """What STORE holds: teacher, data set, views, rows, size on disk, statistics and status."""
    from kdcache.verify import format_info, store_info
    info = store_info(store)
    if as_json:
        import json
        click.echo(json.dumps(info, indent=2))
    else:
        click.echo(format_info(info))


@cli.command("verify")
@click.argument("store")
@click.option("--spot-check", type=click.IntRange(min=0), default=0,
              help="Also re-run the teacher on N random (sample, view) pairs and compare with the stored logits.")
@click.option("--checkpoint", type=click.Path(dir_okay=False),
              help="The teacher checkpoint the store was built with (needed by --spot-check; sha256 must match).")
@click.option("--seed", type=click.IntRange(min=0), default=0, help="Seed of the spot-checked pairs.")
def verify_cmd(store, spot_check, checkpoint, seed):
    """Check every chunk of STORE: checksums, missing chunks, shapes against the manifest, completion,
    NaN/Inf, labels and view parameters in range; optionally re-run the teacher on a sample.

    Stops at the first problem, names it (array, shard or chunk, sample rows, storage key) and exits 1.
    """
    from kdcache.verify import verify_store
    click.echo(verify_store(store, spot_check=spot_check, checkpoint=checkpoint, seed=seed))


def main():
    cli()


class WarningLines(logging.Handler):
    """The library's warnings (logging, logger "kdcache") as `warning: ...` lines on the stderr of the moment."""

    def emit(self, record):
        click.echo(f"warning: {record.getMessage()}", err=True)


def show_warnings() -> None:
    logger = logging.getLogger("kdcache")
    if not any(isinstance(h, WarningLines) for h in logger.handlers):
        logger.addHandler(WarningLines(logging.WARNING))
        logger.propagate = False


if __name__ == "__main__":
    main()
