"""Damage that passes the checksums (every chunk's crc32c is valid), met by every command that reads a store.

Each case damages a copy of the session's smoke store (configs/smoke/train.yaml: 128 samples in 4 shards of 32, inner
chunks of 16, 18 views, 4 classes, stage-2 statistics) on disk, then runs `kdcache verify`, `kdcache stats` and
`kdcache train` as a user would: each must refuse in one line naming the store, the array and the rows (and, for
readers, pointing to `kdcache verify`), never a traceback and never a silently wrong result.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from kdcache.stages.cli import cli, store_damage
from kdcache.errors import StoreDamage
from kdcache.verify import verify_store
from kdcache.stages.compute_stats import compute_stats
from tests.conftest import write_config


@pytest.fixture
def copy(train_store_cfg, tmp_path):
    """A private copy of the smoke store to damage."""
    dst = tmp_path / "store.zarr"
    shutil.copytree(train_store_cfg["cache"]["store"], dst)
    return dst


def one_error_line(*args) -> str:
    """The CLI in-process ended in exit 1 with one `Error:` line last, and no traceback."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: "), result.output
    return last


def train(cfg: dict, store: Path, tmp_path: Path, **train_settings) -> str:
    cfg = {**cfg, "train": {**cfg["train"], **train_settings}}
    return one_error_line("train", "--config", write_config(cfg, tmp_path / "train.yaml"), "--cache", store,
                          "--out", tmp_path / "run")


def stats(store: Path) -> str:
    return one_error_line("stats", store, "--stat", "class_accuracy")


def verify(store: Path) -> str:
    return one_error_line("verify", store)


def names(line: str, store: Path, *fragments: str, hint: bool = True) -> None:
    """The error line names the store, the array and rows (fragments), and suggests `kdcache verify`."""
    assert f"store {store}" in line, line
    for f in fragments:
        assert f in line, (f, line)
    if hint:
        assert f"kdcache verify {store}" in line, line


# ---- damage ----------------------------------------------------------------------------------------

def swap(a: Path, b: Path) -> None:
    """Two shard files exchanged on disk: each still passes its own checksums."""
    data = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(data)


def set_values(store: Path, name: str, index: tuple, value) -> None:
    """One value rewritten through plain zarr (valid chunks and checksums, wrong content)."""
    a = zarr.open_group(str(store), mode="r+")[name]
    block = a[32:64]
    block[index] = value
    a[32:64] = block


def edit_json(path: Path, **changes) -> None:
    doc = json.loads(path.read_text())
    attrs = changes.pop("attributes", None)
    doc.update(changes)
    if attrs is not None:
        doc["attributes"] = attrs(doc["attributes"])
    path.write_text(json.dumps(doc))


# ---- shards swapped on disk -------------------------------------------------------------------------

def test_swapped_label_shards_are_caught_by_verify_and_stats(copy, tmp_path):
    swap(copy / "labels/c/0", copy / "labels/c/1")
    names(verify(copy), copy, "labels samples 0..15 are not the rows written there", hint=False)
    line = stats(copy)
    assert "labels samples 0..15 are not" in line or "labels samples 32..47 are not" in line, line
    names(line, copy, "are not the rows written there")


def test_swapped_logit_shards_are_caught_by_verify_stats_and_train(copy, train_store_cfg, tmp_path):
    swap(copy / "logits/c/1/0/0", copy / "logits/c/3/0/0")
    names(verify(copy), copy, "logits samples 32..47 are not the rows written there", hint=False)
    line = stats(copy)  # the first block to fail: Dask's threads finish in any order
    assert "logits samples 32..47 are not" in line or "logits samples 96..111 are not" in line, line
    names(line, copy, "are not the rows written there")
    names(train(train_store_cfg, copy, tmp_path), copy, "logits samples 32..47 are not the rows written there")
    # reading Zarr blocks (a store larger than memory) checks every chunk it reads too
    line = train(train_store_cfg, copy, tmp_path, memory_gb=0.0)
    assert "logits samples 32..47 are not" in line or "logits samples 96..111 are not" in line, line
    names(line, copy, "are not the rows written there")


def test_a_clean_store_says_its_rows_are_checked(train_store_cfg):
    summary = verify_store(train_store_cfg["cache"]["store"], progress=False)
    assert "every chunk of rows is the one written there (chunk_crc32c)" in summary


def test_a_store_from_before_the_digests_reads_and_verify_says_what_it_cannot_check(copy):
    shutil.rmtree(copy / "chunk_crc32c")
    edit_json(copy / "zarr.json", attributes=lambda a: {k: v for k, v in a.items()
                                                        if k not in ("format_minor_version", "manifest_sha256")})
    summary = verify_store(copy, progress=False)
    assert ("this store predates format 1.1 (no chunk_crc32c nor manifest_sha256): shard files moved to other rows "
            "cannot be detected") in summary
    compute_stats(copy, {"statistics": ["class_accuracy"], "t_base": 2.0, "gammas": [], "std": "unbiased",
                         "ece_bins": 15}, progress=False)


# ---- metadata edited --------------------------------------------------------------------------------

@pytest.mark.parametrize("name, dtype", [("logits", "float32"), ("labels", "int64"), ("views", "float32")])
def test_an_edited_data_type_is_refused_by_every_command(copy, train_store_cfg, tmp_path, name, dtype):
    edit_json(copy / name / "zarr.json", data_type=dtype)
    expected = f"{name}/zarr.json says data type {dtype}"
    for line in (verify(copy), stats(copy), train(train_store_cfg, copy, tmp_path)):
        names(line, copy, expected, hint=False)


def test_a_removed_manifest_sha256_is_refused_by_every_command(copy, train_store_cfg, tmp_path):
    edit_json(copy / "zarr.json", attributes=lambda a: {k: v for k, v in a.items() if k != "manifest_sha256"})
    for line in (verify(copy), stats(copy), train(train_store_cfg, copy, tmp_path)):
        names(line, copy, "lacks manifest_sha256", hint=False)


# ---- values that cannot be right ----------------------------------------------------------------------

def test_a_label_out_of_range_is_refused_by_stats(copy):
    set_values(copy, "labels", (9,), 7)
    names(verify(copy), copy, "labels at sample 41 holds a class outside 0..3: 7", hint=False)
    names(stats(copy), copy, "labels at sample 41 holds a class outside 0..3: 7")


@pytest.mark.parametrize("memory_gb", [4.0, 0.0])  # targets loaded whole, or read from Zarr block by block
def test_a_nan_logit_is_refused_by_stats_and_train(copy, train_store_cfg, tmp_path, memory_gb):
    set_values(copy, "logits", (8, slice(None), 1), np.nan)  # every view: whichever one an epoch draws
    names(stats(copy), copy, "logits at sample 40, view 0 holds NaN/Inf")
    names(train(train_store_cfg, copy, tmp_path, memory_gb=memory_gb), copy, "logits at sample 40, view",
          "holds NaN/Inf")


def test_an_inf_logit_is_refused(copy, train_store_cfg, tmp_path):
    set_values(copy, "logits", (2, 0, 0), np.inf)
    names(verify(copy), copy, "logits at sample 34, view 0 holds NaN/Inf: [inf,", hint=False)
    names(train(train_store_cfg, copy, tmp_path), copy, "logits at sample 34, view 0 holds NaN/Inf")


def test_nan_in_a_statistics_array_is_caught_by_verify_and_refused_by_train(copy, train_store_cfg, tmp_path):
    set_values(copy, "stats/wttm_power_sum_gamma0.1", (5, 2), np.nan)
    names(verify(copy), copy, "stats/wttm_power_sum_gamma0.1 at sample 37, view 2 holds NaN/Inf", hint=False)
    line = train(train_store_cfg, copy, tmp_path, method="wttm", params={"gamma": 0.1})
    names(line, copy, "stats/wttm_power_sum_gamma0.1 at sample 37, view 2 holds NaN/Inf")


# ---- one error type ----------------------------------------------------------------------------------

def test_damage_is_raised_as_store_damage_not_recognised_from_zarrs_text(copy):
    data = bytearray((copy / "logits/c/1/0/0").read_bytes())
    data[40] ^= 0x5A
    (copy / "logits/c/1/0/0").write_bytes(bytes(data))
    with pytest.raises(StoreDamage, match=r"logits samples 32\.\.63 \(key logits/c/1/0/0\): a chunk of the cache "
                                          r"store fails its crc32c checksum"):
        compute_stats(copy, {"statistics": ["mean"], "t_base": 2.0, "gammas": [], "std": "unbiased", "ece_bins": 15},
                      progress=False)
    assert store_damage(ValueError("Stored and computed checksum do not match.")) is None
