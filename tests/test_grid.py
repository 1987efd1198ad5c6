"""Grids: expansion and stable run keys, runs on a dask LocalCluster, kill and resume, failures, the report."""
import copy
import csv
import json
import os
import signal
import statistics
import time
from pathlib import Path

import pytest
import yaml

from kdcache.errors import UserError
from kdcache.report import write_report
from kdcache.stages.grid import expand_grid, load_grid, run_grid, run_key
from tests.conftest import kdcache, write_config



@pytest.fixture(scope="module")
def base_config(tmp_path_factory, train_store_cfg):
    """The smoke train config (as a file) with its store built and stage-2 statistics computed."""
    return write_config(train_store_cfg, tmp_path_factory.mktemp("grid") / "base.yaml")


@pytest.fixture(scope="module")
def threads_cluster():
    """A dask cluster of 2 single-thread workers inside the test process, reached by address like a
    team's cluster (starting worker processes costs ~10 s of imports; the slow test does that)."""
    from distributed import LocalCluster
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, protocol="tcp",
                      dashboard_address=":0") as cluster:
        yield cluster.scheduler_address


def grid_file(tmp_path, base, **grid) -> Path:
    g = {"config": str(base), "out": str(tmp_path / "grid"), "students": ["fmnist_cnn"],
         "methods": {"kd": {"method": "kd"}}, "seeds": [0], **grid}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(g))
    return path


# ---- expansion ----------------------------------------------------------------------------------

def test_expansion_crosses_axes_only_for_methods_that_have_them(tmp_path, base_config):
    g = load_grid(grid_file(tmp_path, base_config, students=["fmnist_cnn", "fmnist_mlp"], seeds=[0, 1],
                            methods={"ce": {"method": "ce"}, "kd": {"method": "kd", "params": {"w_kd": 0.5}},
                                     "ttm": {"method": "ttm"}},
                            params={"T": [2, 4], "gamma": [0.1, 0.2, 0.3]}))
    runs = expand_grid(g)
    count = {label: sum(r["label"] == label for r in runs) for label in ("ce", "kd", "ttm")}
    assert count == {"ce": 2 * 2, "kd": 2 * 2 * 2, "ttm": 2 * 3 * 2}  # ce has neither T nor gamma
    assert len({r["key"] for r in runs}) == len({r["folder"] for r in runs}) == len(runs)
    kd = [r for r in runs if r["label"] == "kd"]
    assert {r["cfg"]["train"]["params"]["T"] for r in kd} == {2.0, 4.0}
    assert all(r["cfg"]["train"]["params"]["w_kd"] == 0.5 for r in kd)  # fixed params kept, axes added
    for r in runs:
        assert r["cfg"]["train"]["out"] == r["folder"] and Path(r["folder"]).name == r["key"][:16]
        assert r["error"] is None and r["cfg"]["seed"] == r["seed"] and r["cfg"]["train"]["student"] == r["student"]


def test_run_keys_are_stable_and_depend_on_what_changes_the_result(tmp_path, base_config):
    g = load_grid(grid_file(tmp_path, base_config, methods={"kd": {"method": "kd"}}))
    (run,) = expand_grid(g)
    # defaults filled in: writing them out is the same run; the folder and device are not part of the key
    g2 = copy.deepcopy(g)
    g2["methods"] = {"other_label": {"method": "kd", "params": {"T": 4.0, "w_ce": 0.1}}}
    g2["set"] = {"device": "auto"}
    (same,) = expand_grid(g2)
    assert same["key"] == run["key"]
    c = copy.deepcopy(run["cfg"])
    c["train"]["out"] = "elsewhere"
    assert run_key(c) == run["key"]
    assert run["key"] == expand_grid(load_grid(tmp_path / "grid.yaml"))[0]["key"]  # same file, same key
    for change in ({"seed": 1}, {"train": {"epochs": 2}}, {"train": {"params": {"T": 3.0}}}):
        g3 = copy.deepcopy(g)
        g3["set"] = change if "params" not in change.get("train", {}) else {}
        if "params" in change.get("train", {}):
            g3["methods"] = {"kd": {"method": "kd", "params": change["train"]["params"]}}
        if "seed" in change:
            g3["seeds"] = [1]
        assert expand_grid(g3)[0]["key"] != run["key"], change


def test_grid_mistakes_are_user_errors(tmp_path, base_config):
    with pytest.raises(UserError, match="unknown grid key"):
        load_grid(grid_file(tmp_path, base_config, metods={}))
    with pytest.raises(UserError, match="non-empty list"):
        expand_grid(load_grid(grid_file(tmp_path, base_config, params={"T": 2})))
    bad = expand_grid(load_grid(grid_file(tmp_path, base_config, methods={"kd": {"params": {"T": -1}}})))
    assert "T=-1" in bad[0]["error"]  # reported per run, not raised: the other runs still go


def test_grid_sets_override_the_base_config_and_are_recorded(tmp_path, base_config):
    path = grid_file(tmp_path, base_config, set={"train": {"epochs": 3, "lr": 0.2}})
    g = load_grid(path, sets=["train.epochs=5", "train.params.T=3", "seed=7"])
    assert g["set"] == {"train": {"epochs": 5, "lr": 0.2, "params": {"T": 3}}, "seed": 7}  # later wins, merged
    with pytest.raises(UserError, match="train.params"):  # the grid sets method parameters per run
        expand_grid(g)
    (run,) = expand_grid(load_grid(path, sets=["train.epochs=5", "train.batch_size=32"]))
    assert run["cfg"]["train"]["epochs"] == 5 and run["cfg"]["train"]["batch_size"] == 32
    assert run["cfg"]["train"]["lr"] == 0.2  # the file's own `set` is kept
    assert run["key"] != expand_grid(load_grid(path))[0]["key"]  # another run, another folder
    with pytest.raises(UserError, match="unknown config key 'train.epoch'"):
        expand_grid(load_grid(path, sets=["train.epoch=5"]))
    from click.testing import CliRunner

    from kdcache.stages.cli import cli
    r = CliRunner().invoke(cli, ["grid", str(path), "--set", "train.epoch=5"])
    assert r.exit_code == 1 and "unknown config key 'train.epoch'" in r.output and "Traceback" not in r.output


# ---- running, failures and the report -----------------------------------------------------------

def test_grid_runs_on_a_cluster_reports_failures_and_its_table(tmp_path, base_config, threads_cluster):
    """Two seeds of KD and of CE, a run with a bad parameter and one with an unknown student: the good
    runs finish, both bad ones are reported, and the table's numbers are those of the result files."""
    path = grid_file(tmp_path, base_config, seeds=[0, 1], students=["fmnist_cnn"],
                     methods={"kd": {"method": "kd"}, "ce": {"method": "ce"},
                              "broken": {"method": "kd", "params": {"T": -1}}},
                     set={"train": {"epochs": 2}})
    g = yaml.safe_load(path.read_text())
    runs = expand_grid(load_grid(path))
    done = run_grid(path, scheduler=threads_cluster, progress=False)
    assert done["runs"] == 6 and done["skipped"] == 0 and len(done["failed"]) == 2
    assert all("T=-1" in e for e in done["failed"].values())
    report = write_report(tmp_path / "grid")
    rows = {r["method"]: r for r in report["rows"]}
    assert set(rows) == {"kd", "ce"} and all(r["seeds"] == 2 for r in rows.values())
    for label, row in rows.items():
        results = [json.loads((Path(r["folder"]) / "result.json").read_text())
                   for r in runs if r["label"] == label]
        best = [x["best_accuracy"] for x in results]
        assert row["best_mean"] == pytest.approx(statistics.fmean(best))
        assert row["best_std"] == pytest.approx(statistics.stdev(best))
        assert row["last_mean"] == pytest.approx(statistics.fmean(x["last_accuracy"] for x in results))
    with open(tmp_path / "grid" / "results.csv") as f:
        table = {r["method"]: r for r in csv.DictReader(f)}
    assert float(table["kd"]["best_mean"]) == pytest.approx(rows["kd"]["best_mean"])
    assert float(table["ce"]["last_std"]) == pytest.approx(rows["ce"]["last_std"])
    text = (tmp_path / "grid" / "results.md").read_text()
    assert "Failed runs (2)" in text and f"{100 * rows['kd']['best_mean']:.2f}" in text
    assert (tmp_path / "grid" / "accuracy.png").stat().st_size > 0 and (tmp_path / "grid" / "curves.png").exists()

    # a run that fails inside its worker (unknown student) is reported with its error; the others finish
    g["students"] = ["fmnist_cnn", "no_such_model"]
    g["methods"] = {"ce": {"method": "ce"}}
    g["seeds"] = [0]
    path.write_text(yaml.safe_dump(g))
    done = run_grid(path, scheduler=threads_cluster, progress=False)
    assert done["skipped"] == 1 and len(done["failed"]) == 1
    (error,) = done["failed"].values()
    assert "no_such_model" in error


@pytest.mark.slow
def test_a_killed_grid_resumes_and_every_run_finishes_exactly_once(tmp_path, base_config):
    """4 runs on 2 workers; SIGKILL the whole grid (driver, scheduler, workers) once a run has finished;
    the re-run skips finished runs, resumes the others, and every run finishes exactly once."""
    path = grid_file(tmp_path, base_config, seeds=[0, 1], methods={"kd": {"method": "kd"}, "ce": {"method": "ce"}},
                     set={"train": {"epochs": 4}})
    proc = kdcache("grid", path, "--workers", 2, start_new_session=True)
    out = tmp_path / "grid"
    deadline = time.time() + 120
    while not list(out.glob("*/result.json")):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "timeout"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished_before = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/result.json")}
    assert 1 <= len(finished_before) < 4

    done = run_grid(path, workers=2, progress=False)
    assert done["skipped"] == len(finished_before) and done["done"] == 4 - len(finished_before)
    assert not done["failed"]
    folders = [out / name for name in json.loads((out / "runs.json").read_text())]
    assert len(folders) == 4
    for folder in folders:
        events = [json.loads(line)["event"] for line in (folder / "events.jsonl").read_text().splitlines()]
        assert events.count("finish") == 1, (folder, events)
        epochs = [json.loads(line)["epoch"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert epochs == [1, 2, 3, 4]
        assert json.loads((folder / "result.json").read_text())["epochs"] == 4
    for name, mtime in finished_before.items():  # not trained again
        assert (out / name / "result.json").stat().st_mtime_ns == mtime


def test_report_and_grid_commands_refuse_mistakes_in_one_line(tmp_path):
    from click.testing import CliRunner

    from kdcache.stages.cli import cli
    r = CliRunner().invoke(cli, ["report", str(tmp_path)])
    assert r.exit_code == 1 and "not a grid folder" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(cli, ["grid", str(tmp_path / "missing.yaml")])
    assert r.exit_code == 1 and "cannot read grid file" in r.output


def test_per_method_train_overrides_real_settings_and_the_saving(tmp_path, base_config, threads_cluster):
    """A label's `train` overrides reach its runs only; the table shows each run's real parameters and
    how it got targets; the report prints the online run against the offline one of the same method."""
    path = grid_file(tmp_path, base_config, set={"train": {"epochs": 1}},
                     methods={"kd": {"method": "kd", "params": {"T": 2}},
                              "kd_online_fresh": {"method": "kd", "params": {"T": 2},
                                                  "train": {"online": True, "augment": "fresh"}},
                              "kd_K2": {"method": "kd", "params": {"T": 2}, "train": {"views_used": 2}}})
    runs = {r["label"]: r for r in expand_grid(load_grid(path))}
    assert runs["kd_online_fresh"]["cfg"]["train"]["online"] and not runs["kd"]["cfg"]["train"]["online"]
    assert runs["kd_K2"]["cfg"]["train"]["views_used"] == 2 and runs["kd"]["cfg"]["train"]["views_used"] is None
    assert len({r["key"] for r in runs.values()}) == 3
    done = run_grid(path, scheduler=threads_cluster, progress=False)
    assert done["done"] == 3 and not done["failed"]
    report = write_report(tmp_path / "grid", plots=False)
    rows = {r["method"]: r for r in report["rows"]}
    assert rows["kd"]["settings"] == "T=2, w_ce=0.1, w_kd=0.9; 18 views/image"  # all the store holds
    assert rows["kd_online_fresh"]["settings"] == "T=2, w_ce=0.1, w_kd=0.9; online; fresh views"
    assert rows["kd_K2"]["settings"] == "T=2, w_ce=0.1, w_kd=0.9; 2 views/image"
    on, off = rows["kd_online_fresh"]["wall_seconds_mean"], rows["kd"]["wall_seconds_mean"]
    assert f"- kd_online_fresh: {on:.1f} s per run; kd from the cache: {off:.1f} s ({on / off:.2f}x)" in report["markdown"]

    bad = grid_file(tmp_path, base_config, methods={"kd": {"method": "kd", "train": {"out": "x"}}})
    with pytest.raises(UserError, match="except method, params, student and out"):
        expand_grid(load_grid(bad))
    bad = grid_file(tmp_path, base_config, methods={"kd": {"method": "kd", "train": {"no_such_key": 1}}})
    with pytest.raises(UserError, match="unknown config key 'train.no_such_key'"):
        expand_grid(load_grid(bad))
