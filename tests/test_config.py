"""The configuration is checked once, when it is loaded: a bad value in any section fails every command that
loads a config, with one `Error:` line, before the command does any work (no store, run folder or grid
folder is created, no cluster starts); what needs the data (the class count, the image size) waits for it."""
import copy
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from kdcache.config import DEFAULTS, check_config, load_config
from kdcache.errors import UserError
from kdcache.stages.cli import cli
from tests.conftest import REPO, SMOKE

# one bad value per section (a --set item) and the start of its message
BAD = [
    ("seed=-1", "seed must be an integer >= 0, got -1"),
    ("device=gpu", "unknown device 'gpu'; use 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ("teacher.checkpoint=3", "teacher.checkpoint must be a path or URL, got 3"),
    ("teacher.epochs=0", "teacher.epochs must be an integer >= 1, got 0"),
    ("dataset.name=mnist", "unknown data set 'mnist': choose one of"),
    ("dataset.subset=0", "subset must be a positive integer (keep the first n samples), got 0"),
    ("dataset.options.colour=3", "data set 'synthetic' does not take options ['colour']"),
    ("views.padding=-1", "views.padding (crop_flip) must be an integer >= 0, got -1"),
    ("views={kind: center_crop, size: 0}", "views.size (center_crop output side) must be an integer >= 1, got 0"),
    ("cache.batch_size=0", "cache.batch_size must be an integer >= 1, got 0"),
    ("cache.workers=2147483648", "cache.workers must be an integer >= 0 (DataLoader worker processes), at most"),
    ("train.workers=1000000000000", "train.workers must be an integer >= 0 (DataLoader processes replaying"),
    ("stats.workers=1000000", "--workers must be at most"),  # not a fork bomb: the fuzz found these
    ("cache.encoding={quantized: 4}", "cache.encoding.quantized must be 8 or 16 (bits per logit), got 4"),
    ("cache.topk=ten", "cache.topk must be an integer >= 1 (and below the class count)"),
    ("stats.gammas=[-1]", "stats.gammas (gamma) must be a finite number > 0, got -1"),
    ("stats.std=sample", "stats.std must be one of unbiased, population, got 'sample'"),
    ("train.lr=-1", "train.lr must be a number > 0, got -1"),
    ("train.lr=.nan", "train.lr must be a number > 0, got nan"),
    ("train.schedule=step", "train.schedule 'step' needs train.milestones"),
    ("train.params.T=-1", "method 'kd': parameter T=-1 must be a number > 0"),
    ("train.method=fitnet", "unknown distillation method 'fitnet'"),
]
COMMANDS = ["config", "train-teacher", "cache-teacher", "stats", "train"]


@pytest.fixture
def config(tmp_path) -> Path:
    """The smoke config with every path under tmp_path/out (so a command that started work would show there)."""
    cfg = load_config(SMOKE)
    out = tmp_path / "out"
    cfg["teacher"]["checkpoint"] = str(out / "teacher.pt")
    cfg["cache"]["store"] = str(out / "cache.zarr")
    cfg["train"]["out"] = str(out / "run")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("item, message", BAD, ids=[b[0] for b in BAD])
def test_every_command_refuses_a_bad_value_of_any_section_at_load(item, message, config, tmp_path):
    for command in COMMANDS:
        r = CliRunner().invoke(cli, [command, "--config", str(config), "--set", item])
        lines = r.output.strip().splitlines()
        assert r.exit_code == 1, (command, r.output)
        assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], (command, r.output)
        assert "Traceback" not in r.output and not (tmp_path / "out").exists(), command


def test_the_same_mistake_in_the_file_or_from_python_reads_the_same(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"train": {"lr": -1}}))
    with pytest.raises(UserError, match=r"^train\.lr must be a number > 0, got -1$"):
        load_config(path)
    cfg = copy.deepcopy(DEFAULTS)
    assert check_config(cfg) is cfg  # the defaults are valid
    cfg["stats"]["ece_bins"] = 0
    with pytest.raises(UserError, match=r"^stats\.ece_bins must be an integer >= 1, got 0$"):
        check_config(cfg)


def test_what_needs_the_data_waits_for_the_stage():
    """cache.topk's upper bound is the class count and crop_flip reads the image size: both known only when a
    stage opens the data set, so a config with them loads."""
    cfg = load_config(SMOKE, sets=["cache.topk=1000", "views.padding=40"])
    assert (cfg["cache"]["topk"], cfg["views"]["padding"]) == (1000, 40)


def test_every_shipped_config_loads():
    paths = sorted((REPO / "configs").rglob("*.yaml"))
    configs = [p for p in paths if "methods" not in (yaml.safe_load(p.read_text()) or {})]  # not grid files
    assert len(configs) > 50
    for path in configs:
        load_config(path)


def grid(tmp_path, **keys) -> Path:
    g = {"config": str(SMOKE), "out": str(tmp_path / "grid"), "methods": {"kd": {"method": "kd"}}, **keys}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(g))
    return path


@pytest.mark.parametrize("keys, sets, message", [
    ({}, ["train.lr=-1"], "Error: grid `set`: train.lr must be a number > 0, got -1"),
    ({"set": {"stats": {"std": "sample"}}}, [], "Error: grid `set`: stats.std must be one of"),
    ({}, ["dataset.name=mnist"], "Error: grid `set`: unknown data set 'mnist'"),
    ({"methods": {"kd": {"method": "kd", "train": {"epochs": 0}}}}, [],
     "Error: grid method 'kd' (student fmnist_cnn, seed 0): train.epochs must be an integer >= 1, got 0"),
])
def test_a_grid_with_a_bad_value_fails_before_any_run_starts(tmp_path, keys, sets, message):
    r = CliRunner().invoke(cli, ["grid", str(grid(tmp_path, **keys)), *(a for s in sets for a in ("--set", s))])
    assert r.exit_code == 1 and r.output.strip().splitlines() == [r.output.strip()], r.output
    assert r.output.startswith(message), r.output
    assert not (tmp_path / "grid").exists()  # no folder, no runs, no cluster


def test_a_grid_run_with_bad_method_parameters_is_still_reported_per_run(tmp_path):
    """The methods own their parameters: a swept value one method refuses fails that run only (tests/test_grid.py
    runs them); everything else was checked at load."""
    from kdcache.stages.grid import expand_grid, load_grid
    runs = expand_grid(load_grid(grid(tmp_path, params={"T": [-1, 4]})))
    assert [r["error"] for r in runs] == ["method 'kd': parameter T=-1 must be a number > 0", None]


@pytest.mark.parametrize("args", [["stats", "STORE", "--workers", "100000"], ["grid", "GRID", "--workers", "100000"]])
def test_absurd_numbers_of_local_processes_are_refused(args, tmp_path):
    r = CliRunner().invoke(cli, [str(tmp_path / a) if a.isupper() else a for a in args])
    assert r.exit_code == 1 and r.output.startswith("Error: --workers must be at most "), r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
