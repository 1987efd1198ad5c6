"""Fuzzing with hypothesis: configs with generated values at any key, generated grid files, store manifests
and command-line values. Whatever is generated, a command ends in exit 0, or in one `Error:` line as the
last line (exit 1 or 2) -- never a traceback -- and a refusal writes nothing (no file added or changed
under the case's folder or the shared store, no store newly complete).

The fast suite runs FAST_EXAMPLES examples per test; the slow suite (`-m slow`) SLOW_EXAMPLES, over
1,000 in all. The cases are kept small: a value that is valid only means more work (say, 10^9 epochs)
is not generated for the keys where it would run for long; the command-line `--epochs` is 1.
"""
import copy
import shutil
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdcache.config import DEFAULTS
from tests.test_bad_input import Env, complete_stores, make_env, run, snapshot

FAST_EXAMPLES, SLOW_EXAMPLES = 12, 260
ABSURD_INTS = [0, -1, 1, 3, 2**31, 2**53 + 1, 2**63, 2**64 + 1, 10**12, 10**30, -(10**20)]
VALUES = st.one_of(
    st.none(), st.booleans(), st.sampled_from(ABSURD_INTS), st.integers(-5, 100),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(["", "all", "x", "cpu", "float16", "kd", "../x"]),
    st.text(max_size=8), st.lists(st.integers(-2, 5), max_size=3), st.dictionaries(st.text(max_size=3),
                                                                                    st.integers(), max_size=2),
    st.binary(max_size=6))


def leaf_keys(d: dict, where="") -> list[str]:
    return [k for key, v in d.items() for k in (leaf_keys(v, f"{where}{key}.") if isinstance(v, dict) and v
                                                 else [f"{where}{key}"])]


# keys whose valid values only mean more work, which the cases would then do (e.g. 10^9 epochs)
LONG = {"teacher.epochs", "train.epochs"}
KEYS = sorted(set(leaf_keys(DEFAULTS)) - LONG) + [
    "dataset.options.num_samples", "dataset.options.num_classes", "dataset.options.size",
    "dataset.options.channels", "views.padding", "views.views", "views.seed", "views.kind"]


def changed(base: dict, changes: list) -> dict:
    """`base` with dotted keys set; an absolute path made of a generated string is made relative (the
    cases run in their own folder: a run folder `/` would write into the root)."""
    cfg = copy.deepcopy(base)
    for dotted, value in changes:
        if isinstance(value, str) and value.startswith(("/", "~")):
            value = "./" + value.lstrip("/~")
        *sections, key = dotted.split(".")
        node = cfg
        for s in sections:
            if not isinstance(node.get(s), dict):
                node[s] = {}
            node = node[s]
        node[key] = value
    return cfg


CHANGES = st.lists(st.tuples(st.sampled_from(KEYS), VALUES), min_size=1, max_size=3)


@pytest.fixture(scope="module", autouse=True)
def memory_limit():
    """An address-space limit while fuzzing: a generated size that slips past the up-front checks fails
    with MemoryError (the CLI's one line) instead of growing until the OOM killer ends the machine's jobs."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (FUZZ_MEMORY, hard))
    yield
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


FUZZ_MEMORY = 8 * 2**30


@pytest.fixture(scope="module")
def env(tmp_path_factory, teacher_ckpt, train_store_cfg):
    return make_env(tmp_path_factory.mktemp("fuzz_shared"), teacher_ckpt, train_store_cfg)


def check(env: Env, tmp: Path, args: list):
    """Run one generated command in its folder `tmp` (also the working directory): success, or one error
    line and nothing written."""
    before = snapshot(env.shared, env.store, tmp)
    complete_before = complete_stores(tmp)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        code, lines, error, crashed = run(args)
    assert crashed is None, f"a traceback ({crashed}) for {args}"
    assert code in (0, 1, 2), (code, lines)
    if code:
        assert lines and lines[-1] == error and sum(line.startswith("Error:") for line in lines) == 1, lines
        after = snapshot(env.shared, env.store, tmp)
        assert after == before, f"a refusal wrote {sorted(set(after) ^ set(before))[:3]} for {args}: {error}"
        assert complete_stores(tmp) == complete_before
    assert snapshot(env.shared, env.store) == {p: s for p, s in before.items() if not p.is_relative_to(tmp)}


def fresh(tmp_root: Path) -> Path:
    tmp = tmp_root / "case"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def small_syn(env: Env, tmp: Path) -> dict:
    """The stage-1 smoke config made small (64 samples, 2 views), writing under tmp."""
    return changed(env.syn, [("dataset.options.num_samples", 64), ("views.views", 2),
                             ("cache.store", str(tmp / "cache.zarr")), ("teacher.checkpoint", str(env.teacher))])


def write(tmp: Path, cfg: dict, name="config.yaml") -> Path:
    (tmp / name).write_text(yaml.safe_dump(cfg))
    return tmp / name


def fuzz(examples):
    return settings(max_examples=examples, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def config_case(env, tmp_path, changes):
    tmp = fresh(tmp_path)
    check(env, tmp, ["config", "--config", write(tmp, changed(small_syn(env, tmp), changes))])


def cache_case(env, tmp_path, changes):
    tmp = fresh(tmp_path)
    check(env, tmp, ["cache-teacher", "--config", write(tmp, changed(small_syn(env, tmp), changes))])


def train_case(env, tmp_path, changes):
    tmp = fresh(tmp_path)
    cfg = changed(env.train, [("train.out", str(tmp / "run"))] + changes)
    check(env, tmp, ["train", "--config", write(tmp, cfg), "--epochs", "1"])


def stats_case(env, tmp_path, changes):
    tmp = fresh(tmp_path)
    cfg = changed(env.train, changes)  # --out: never the shared store's own stats/
    check(env, tmp, ["stats", "--config", write(tmp, cfg), "--stat", "entropy", "--out", tmp / "overlay.zarr"])


GRID_VALUES = st.one_of(VALUES, st.just([]), st.just({}), st.just(["fmnist_cnn"]), st.just({"kd": {"method": "kd"}}))


def grid_case(env, tmp_path, grid_changes):
    tmp = fresh(tmp_path)
    base = write(tmp, changed(env.train, [("train.epochs", 1)]), "base.yaml")
    grid = {"config": str(base), "out": str(tmp / "grid"), "students": ["fmnist_cnn"],
            "methods": {"kd": {"method": "kd"}}, "seeds": [0]}
    grid.update(grid_changes)
    from kdcache.stages.grid import expand_grid, load_grid
    path = write(tmp, grid, "grid.yaml")
    # the grid's own checks only (a valid grid would start a dask cluster): a UserError or a list of runs
    from kdcache.errors import UserError
    before = snapshot(tmp)
    try:
        runs = expand_grid(load_grid(path))
        assert isinstance(runs, list)
    except UserError as e:
        assert "\n" not in str(e)
    assert snapshot(tmp) == before


MANIFEST_KEYS = ["teacher.num_classes", "teacher.arch", "dataset.num_samples", "dataset.name", "views.kind",
                 "views.num_views", "views.padding", "logits.dtype", "logits.k", "logits.storage", "format_version",
                 "status", "manifest"]


def manifest_case(env, tmp_path, changes, command):
    """A copy of the shared store whose zarr.json attributes (manifest, status, format version) are edited."""
    import json
    tmp = fresh(tmp_path)
    copy_ = tmp / "copy.zarr"
    shutil.copytree(env.store, copy_)
    doc = json.loads((copy_ / "zarr.json").read_text())
    attrs = doc["attributes"]
    for dotted, value in changes:
        if dotted in ("format_version", "status", "manifest"):
            attrs[dotted] = value
        elif isinstance(attrs.get("manifest"), dict):
            section, key = dotted.split(".")
            if isinstance(attrs["manifest"].get(section), dict):
                attrs["manifest"][section][key] = value
    try:
        text = json.dumps(doc, allow_nan=True)
    except (TypeError, ValueError):  # bytes: not JSON-able, so not a manifest anyone could write
        return
    (copy_ / "zarr.json").write_text(text)
    args = {"info": ["info", copy_], "verify": ["verify", copy_],
            "train": ["train", "--config", write(tmp, changed(env.train, [("train.out", str(tmp / "run"))])),
                      "--cache", copy_, "--epochs", "1"],
            "stats": ["stats", copy_, "--stat", "entropy", "--out", tmp / "overlay.zarr"]}[command]
    check(env, tmp, args)


OPTION_VALUES = st.one_of(st.sampled_from(["0", "-1", "nan", "inf", "1e400", str(2**64), "abc", "", "memory://x.zarr",
                                           "::", "x::y", "\x00"]), st.text(max_size=6))
CLI = [("cache-teacher", "--batch-size"), ("cache-teacher", "--num-shards"), ("cache-teacher", "--shard-index"),
       ("cache-teacher", "--out"), ("cache-teacher", "--device"), ("stats", "--t-base"), ("stats", "--gamma"),
       ("stats", "--ece-bins"), ("stats", "--workers"), ("stats", "--out"), ("train", "--seed"), ("train", "--out"),
       ("train", "--cache"), ("train", "--stats"), ("info", None), ("verify", "--spot-check")]


def cli_case(env, tmp_path, which, value):
    command, option = CLI[which]
    value = value.replace("\x00", "").lstrip("/~")  # NUL: no argument has one; paths: under the case's folder
    tmp = fresh(tmp_path)
    if command == "cache-teacher":
        args = ["cache-teacher", "--config", write(tmp, small_syn(env, tmp))]
    elif command == "stats":
        args = ["stats", env.store, "--stat", "entropy", "--out", tmp / "overlay.zarr"]
    elif command == "train":
        args = ["train", "--config", write(tmp, changed(env.train, [("train.out", str(tmp / "run"))])),
                "--epochs", "1"]
    else:
        args = [command] if option else [command, value]
        if command == "verify":
            args.append(env.store)
    if option:
        args += [option, value]
    check(env, tmp, args)


TESTS = {"config": (CHANGES, config_case), "cache": (CHANGES, cache_case), "train": (CHANGES, train_case),
         "stats": (CHANGES, stats_case)}


def _make(case, strategy, examples):
    @fuzz(examples)
    @given(changes=strategy)
    def test(env, tmp_path, changes):
        case(env, tmp_path, changes)
    return test


def _grid(examples):
    @fuzz(examples)
    @given(grid_changes=st.dictionaries(st.sampled_from(["config", "set", "out", "students", "methods", "params",
                                                         "seeds", "method"]), GRID_VALUES, min_size=1, max_size=3))
    def test(env, tmp_path, grid_changes):
        grid_case(env, tmp_path, grid_changes)
    return test


def _manifest(examples):
    @fuzz(examples)
    @given(changes=st.lists(st.tuples(st.sampled_from(MANIFEST_KEYS), VALUES), min_size=1, max_size=2),
           command=st.sampled_from(["info", "verify", "train", "stats"]))
    def test(env, tmp_path, changes, command):
        manifest_case(env, tmp_path, changes, command)
    return test


def _cli(examples):
    @fuzz(examples)
    @given(which=st.integers(0, len(CLI) - 1), value=OPTION_VALUES)
    def test(env, tmp_path, which, value):
        cli_case(env, tmp_path, which, value)
    return test


test_fuzz_config = _make(config_case, CHANGES, FAST_EXAMPLES)
test_fuzz_cache_teacher = _make(cache_case, CHANGES, FAST_EXAMPLES)
test_fuzz_train = _make(train_case, CHANGES, FAST_EXAMPLES)
test_fuzz_stats = _make(stats_case, CHANGES, FAST_EXAMPLES)
test_fuzz_grid = _grid(FAST_EXAMPLES)
test_fuzz_manifest = _manifest(FAST_EXAMPLES)
test_fuzz_cli = _cli(FAST_EXAMPLES)

# the slow suite: 7 x SLOW_EXAMPLES = 1,820 generated cases
test_fuzz_config_many = pytest.mark.slow(_make(config_case, CHANGES, SLOW_EXAMPLES))
test_fuzz_cache_teacher_many = pytest.mark.slow(_make(cache_case, CHANGES, SLOW_EXAMPLES))
test_fuzz_train_many = pytest.mark.slow(_make(train_case, CHANGES, SLOW_EXAMPLES))
test_fuzz_stats_many = pytest.mark.slow(_make(stats_case, CHANGES, SLOW_EXAMPLES))
test_fuzz_grid_many = pytest.mark.slow(_grid(SLOW_EXAMPLES))
test_fuzz_manifest_many = pytest.mark.slow(_manifest(SLOW_EXAMPLES))
test_fuzz_cli_many = pytest.mark.slow(_cli(SLOW_EXAMPLES))
