"""`--set KEY=VALUE` on every command that takes --config: parsed as YAML, checked like the file, applied after
the file and before the command's own options, recorded in the run's resolved config."""
import importlib
import json

import pytest
import yaml
from hypothesis import given, settings, strategies as st

from kdcache.config import load_config, parse_set
from kdcache.errors import UserError
from tests.conftest import REPO, SMOKE, write_config
from tests.test_bad_input import run

SMOKE_TRAIN = REPO / "configs" / "smoke" / "train.yaml"


# ---- parsing ------------------------------------------------------------------------------------

@pytest.mark.parametrize("item, value", [
    ("train.epochs=3", 3), ("train.lr=0.1", 0.1), ("train.lr=1.0e-3", 1e-3), ("train.lr=1e-3", "1e-3"),
    ("train.milestones=[30, 60]", [30, 60]),
    ("train.views_used=null", None), ("train.nesterov=true", True), ("train.nesterov=off", False),
    ("train.optimizer=adamw", "adamw"), ("train.out='007'", "007"), ("train.out=a=b", "a=b"),
    ("train.params={T: 4}", {"T": 4}),
])
def test_values_are_yaml(item, value):
    """YAML 1.1 as in the file: 1e-3 without a dot is a string (which the stage's check refuses)."""
    assert parse_set(item) == {"train": {item.split("=")[0].split(".")[1]: value}}


@pytest.mark.parametrize("item, message", [
    ("foo", "must be KEY=VALUE"), ("=1", "must be KEY=VALUE"), ("a..b=1", "must be KEY=VALUE"),
    ("train.=1", "must be KEY=VALUE"), (".lr=1", "must be KEY=VALUE"), ("train. lr=1", "must be KEY=VALUE"),
    ("train\nx.lr=1", "must be KEY=VALUE"), (" train.lr=1", "must be KEY=VALUE"),
    ("train.lr=", "has no value; write train.lr=null"), ("train.milestones=[1, 2", "not valid YAML"),
    ("train.lr=!!python/object:os.system ls", "not valid YAML"),
])
def test_malformed_items_are_one_line_errors(item, message):
    with pytest.raises(UserError, match=message) as e:
        parse_set(item)
    assert "\n" not in str(e.value)


def test_layers_file_then_sets_in_order_then_options():
    cfg = load_config(SMOKE_TRAIN, {"train": {"epochs": 9}},
                      sets=["train.lr=0.2", "train.lr=0.3", "train.epochs=5", "train.views_used=null", "seed=4"])
    assert (cfg["train"]["lr"], cfg["train"]["epochs"], cfg["seed"]) == (0.3, 9, 4)
    assert cfg["train"]["batch_size"] == 32  # the file's other keys stay
    assert cfg["train"]["views_used"] is None  # null is a value here, not "not given"


def test_sets_merge_inside_sections_and_free_form_mappings():
    cfg = load_config(SMOKE, sets=["views.views=16", "dataset.options.seed=3", "train.params.T=2",
                                   "train.params={w_kd: 0.5}"])
    assert cfg["views"] == {**load_config(SMOKE)["views"], "views": 16}
    assert cfg["dataset"]["options"] == {"num_samples": 512, "num_classes": 4, "channels": 1, "size": 16, "seed": 3}
    assert cfg["train"]["params"] == {"T": 2, "w_kd": 0.5}  # keys the data set and the method check (at load)


@pytest.mark.parametrize("item, message", [
    ("train.learning_rate=0.1", "--set train.learning_rate: unknown config key 'train.learning_rate'"),
    ("trian.lr=0.1", "unknown config key 'trian'"),
    ("dataset=synthetic", "config key 'dataset' must be a mapping, got 'synthetic'"),
    ("seed=-1", "seed must be an integer >= 0, got -1"),
])
def test_sets_are_checked_like_the_file(item, message):
    with pytest.raises(UserError, match=message.replace(".", r"\.")):
        load_config(SMOKE, sets=[item])


@pytest.mark.parametrize("item, message", [
    ("train.params={T:4,w_kd:0.9}", "unknown parameter(s) T:4, w_kd:0.9 for method 'kd'; allowed: "),
    ("train={epochs:3}", "unknown config key 'train.epochs:3'"),
])
def test_a_key_without_a_space_after_its_colon_is_named(item, message):
    """YAML reads {T:4} as the one key 'T:4' (no value): the message says so."""
    with pytest.raises(UserError) as e:
        load_config(SMOKE, sets=[item])
    assert message in str(e.value) and str(e.value).endswith("put a space after each colon, {T: 4})")
    with pytest.raises(UserError) as e:
        load_config(SMOKE, sets=["train.params={temp: 4}"])
    assert "colon" not in str(e.value)


# ---- every command ------------------------------------------------------------------------------

class Captured(UserError):
    """Raised by a stand-in stage: the command stops there and the test reads what the stage got."""


@pytest.fixture
def capture(monkeypatch):
    """Replace every stage entry point by one that records its arguments (the config first; stats: the store
    and the stats section) and stops the command."""
    got = {}

    def stand_in(name):
        def stage(*args, **kw):
            got[name] = args
            raise Captured("captured")
        return stage
    for command, function in (("train-teacher", "train_teacher"), ("cache-teacher", "cache_teacher"),
                              ("stats", "compute_stats"), ("train", "train_student")):
        monkeypatch.setattr(importlib.import_module(f"kdcache.stages.{function}"), function, stand_in(command))
    return got


@pytest.mark.parametrize("command, section", [("train-teacher", "teacher"), ("cache-teacher", "cache"),
                                              ("stats", "stats"), ("train", "train")])
def test_every_command_takes_sets(capture, command, section):
    key = {"teacher": "lr", "cache": "batch_size", "stats": "t_base", "train": "lr"}[section]
    code, lines, error, crashed = run([command, "--config", SMOKE_TRAIN, "--set", f"{section}.{key}=7",
                                       "--set", "views.views=3", "--set", "dataset.subset=null"])
    assert (code, error, crashed) == (1, "Error: captured", None), lines
    if command == "stats":
        assert capture[command][1][key] == 7
    else:
        cfg = capture[command][0]
        assert cfg[section][key] == 7 and cfg["views"]["views"] == 3 and cfg["dataset"]["subset"] is None


@pytest.mark.parametrize("command, option, key, value", [
    ("train-teacher", ["--epochs", "2"], "teacher.epochs", 2),
    ("cache-teacher", ["--batch-size", "8"], "cache.batch_size", 8),
    ("train", ["--epochs", "2"], "train.epochs", 2),
    ("train", ["--seed", "5"], "seed", 5),
])
def test_the_commands_own_options_win(capture, command, option, key, value):
    run([command, "--config", SMOKE_TRAIN, "--set", f"{key}=99", *option])
    cfg = capture[command][0]
    for part in key.split("."):
        cfg = cfg[part]
    assert cfg == value


def test_stats_options_win_and_sets_reach_the_stats_section(capture):
    run(["stats", "--config", SMOKE_TRAIN, "--set", "stats.gammas=[0.2, 0.4]", "--set", "stats.std=population",
         "--set", "cache.store=other.zarr", "--gamma", "0.5"])
    store, stats = capture["stats"]
    assert store == "other.zarr" and stats["gammas"] == [0.5] and stats["std"] == "population"


def test_config_prints_the_overrides(tmp_path):
    code, lines, _, crashed = run(["config", "--config", SMOKE, "--set", "train.lr=0.25", "--set", "views.views=16",
                                   "--set", "train.milestones=[3, 6]", "--set", "cache.stats=null"])
    assert code == 0 and crashed is None, lines
    cfg = yaml.safe_load("\n".join(lines))
    assert cfg["train"]["lr"] == 0.25 and cfg["views"]["views"] == 16 and cfg["train"]["milestones"] == [3, 6]
    code, lines, _, _ = run(["config", "--set", "train.nesterov=yes", "train.nesterov"])
    assert (code, lines) == (0, ["True"])


@pytest.mark.parametrize("args, code, message", [
    (["--set", "train.learning_rate=0.1"], 1, "Error: --set train.learning_rate: unknown config key"),
    (["--set", "foo"], 1, "Error: --set 'foo' must be KEY=VALUE"),
    (["--set", "=1"], 1, "Error: --set '=1' must be KEY=VALUE"),
    (["--set", "a..b=1"], 1, "Error: --set 'a..b=1' must be KEY=VALUE"),
    (["--set"], 2, "Error: Option '--set' requires an argument"),
])
@pytest.mark.parametrize("command", ["config", "train-teacher", "cache-teacher", "stats", "train"])
def test_bad_sets_are_one_line_on_every_command(capture, command, args, code, message):
    got, lines, error, crashed = run([command, "--config", SMOKE_TRAIN, *args])
    assert crashed is None and got == code and error.startswith(message), lines
    assert sum(line.startswith("Error:") for line in lines) == 1 and not capture


KEYS = ["seed", "train", "train.lr", "train.params", "train.params.T", "views", "views.kind", "views.views",
        "dataset.options", "dataset.options.size", "cache.store", "cache.stats", "nope", "train.nope.x"]


@settings(max_examples=60, deadline=None)
@given(item=st.text(max_size=24) | st.builds("{}={}".format, st.sampled_from(KEYS), st.text(max_size=12)))
def test_any_item_gives_a_config_or_one_error_line(item):
    code, lines, error, crashed = run(["config", "--config", SMOKE_TRAIN, "--set", item.replace("\x00", "")])
    assert crashed is None, crashed
    assert code == 0 or code == 1 and lines[-1] == error and sum(line.startswith("Error:") for line in lines) == 1


# ---- recorded by a real run ---------------------------------------------------------------------

def test_a_stage3_run_records_the_overrides(train_store_cfg, tmp_path):
    cfg = json.loads(json.dumps(train_store_cfg))
    path = write_config(cfg, tmp_path / "train.yaml")
    code, lines, _, crashed = run(["train", "--config", path, "--out", tmp_path / "run", "--set", "train.lr=0.07",
                                   "--set", "train.params.T=3", "--set", "train.views_used=4",
                                   "--set", "train.batch_size=64"])
    assert code == 0 and crashed is None, lines
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    t = result["config"]["train"]
    assert (t["lr"], t["params"]["T"], t["views_used"], t["batch_size"]) == (0.07, 3, 4, 64)
    assert t["out"] == str(tmp_path / "run")
