"""kdcache info and verify, and a one-line error (never a traceback) from every command on a damaged store.

Every case damages a copy of the session's smoke store (configs/smoke/train.yaml: 128 samples in 4 shards of
32 (2 inner chunks of 16), 18 views, 4 classes, stage-2 statistics) the way a disk, a copy or a person
would, then checks what `kdcache verify` names and what stage 2 (`kdcache stats`) and `kdcache info` say.
"""
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from kdcache.stages.cli import cli
from kdcache.errors import UserError
from kdcache.verify import CorruptStore, store_info, verify_store


@pytest.fixture
def clean(train_store_cfg):
    return Path(train_store_cfg["cache"]["store"])


@pytest.fixture
def copy(clean, tmp_path):
    """A private copy of the smoke store to damage."""
    dst = tmp_path / "store.zarr"
    shutil.copytree(clean, dst)
    return dst


def run(*args):
    """The CLI in-process; asserts it ended in a one-line message, not a traceback."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    return result


def one_error_line(result) -> str:
    """The command failed with exit code 1 and its last line is the error (progress bars may precede it)."""
    assert result.exit_code == 1, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: "), result.output
    return last


# ---- damage, as it happens -------------------------------------------------------------------------

def flip_byte(path: Path, offset: int):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def truncate(path: Path, keep: int):
    path.write_bytes(path.read_bytes()[:keep])


def edit_attrs(store: Path, **changes):
    """Edit the group's zarr.json by hand, as a person with a text editor would."""
    meta = json.loads((store / "zarr.json").read_text())
    for key, value in changes.items():
        meta["attributes"][key] = value
    (store / "zarr.json").write_text(json.dumps(meta, indent=2))


def plain(store: Path, name: str) -> zarr.Array:
    """An array opened with plain zarr (default config: chunks equal to the fill value are not stored)."""
    return zarr.open_group(str(store), mode="r+")[name]


def drop_inner_chunk(store):  # a writer that skipped a chunk: rows 32..47 read as zeros, index intact
    plain(store, "logits")[32:48] = 0


def put_nan(store):
    a = plain(store, "logits")
    block = a[32:64]
    block[8, 3, 1] = np.nan
    a[32:64] = block


def bad_label(store):
    a = plain(store, "labels")
    block = a[32:64]
    block[9] = 7
    a[32:64] = block


def bad_view(store):
    a = plain(store, "views")
    block = a[32:64]
    block[10, 5] = (0, 3, 0)  # dx 3 > 2 * padding
    a[32:64] = block


# case id -> (damage, what verify names)
VERIFY_CASES = {
    "flipped byte in a chunk": (lambda s: flip_byte(s / "logits/c/1/0/0", 40),
                                r"logits shard \(1, 0, 0\) \(samples 32\.\.63\) \(key logits/c/1/0/0\): inner chunk "
                                r"\(\d, 0, 0\) \(samples \d+\.\.\d+\) fails its crc32c checksum"),
    "flipped byte in a shard index": (lambda s: flip_byte(s / "views/c/2/0/0", -10),
                                      r"views shard \(2, 0, 0\) \(samples 64\.\.95\) \(key views/c/2/0/0\): its chunk "
                                      r"index fails its crc32c checksum"),
    "truncated shard": (lambda s: truncate(s / "logits/c/3/0/0", 200),
                        r"key logits/c/3/0/0\): its chunk index fails its crc32c checksum \(200 bytes\)"),
    "empty shard": (lambda s: truncate(s / "labels/c/1", 0),
                    r"labels/c/1 \(samples 32\.\.63\) is empty \(0 bytes, truncated\)"),
    "missing shard": (lambda s: (s / "logits/c/2/0/0").unlink(), r"logits/c/2/0/0 \(samples 64\.\.95\) is missing"),
    "missing chunk in a shard": (drop_inner_chunk, r"key logits/c/1/0/0\): inner chunk \(0, 0, 0\) \(samples 32\.\.47\) "
                                                   r"is missing from the shard index"),
    "missing completion record": (lambda s: (s / "shard_done/c/3").unlink(), r"shard_done/c/3 \(shard 3\) is missing"),
    "NaN logit": (put_nan, r"logits at sample 40, view 3 holds NaN/Inf"),
    "label out of range": (bad_label, r"labels at sample 41 holds a class outside 0\.\.3: 7"),
    "view out of range": (bad_view, r"views at sample 42, view 5 holds view parameters outside the crop_flip view "
                                    r"space \(dy, dx in 0\.\.2, flip 0/1\): \[0, 3, 0\]"),
    "edited manifest": (lambda s: edit_attrs(s, manifest={**json.loads((s / "zarr.json").read_text())["attributes"]
                                                          ["manifest"], "views": {"kind": "crop_flip"}}),
                        r"the manifest in its zarr\.json was edited after creation"),
    "wrong format version": (lambda s: edit_attrs(s, format_version="1"), r"unknown format version '1'"),
    "newer format version": (lambda s: edit_attrs(s, format_version=2),
                             r"format version 2, newer than this kdcache reads \(1\): upgrade kdcache"),
    "not a kdcache store": (lambda s: edit_attrs(s, format="something-else"), r"is not a kdcache store"),
    "unreadable array metadata": (lambda s: (s / "logits/zarr.json").write_text("{not json"),
                                  r"the metadata of 'logits' \(logits/zarr\.json\) is unreadable"),
    "deleted array metadata": (lambda s: (s / "labels/zarr.json").unlink(), r"has no 'labels' array"),
    "unreadable statistics metadata": (lambda s: (s / "stats/mlt_temperature_unbiased/zarr.json").write_text("{no"),
                                       r"stats/mlt_temperature_unbiased/zarr\.json is not valid JSON"),
    "deleted manifest": (lambda s: (s / "zarr.json").unlink(), r"store\.zarr"),
    "manifest not JSON": (lambda s: (s / "zarr.json").write_text((s / "zarr.json").read_text()[:-40]),
                          r"store\.zarr"),
    "completion record says not done": (lambda s: edit_attrs(s, status="incomplete") or
                                        plain(s, "shard_done").__setitem__(1, 0),
                                        r"is incomplete: 3/4 shards done \(status incomplete\)"),
}


@pytest.mark.parametrize("case", VERIFY_CASES)
def test_verify_names_the_damage(copy, case):
    damage, expected = VERIFY_CASES[case]
    damage(copy)
    with pytest.raises(UserError, match=expected):
        verify_store(copy, progress=False)
    line = one_error_line(run("verify", copy))
    assert "Traceback" not in line


# Damage that readers meet: stage 2 (reads every logit) and info must give one line too.
READ_CASES = {
    "flipped byte in a chunk": r"a chunk of the cache store fails its crc32c checksum.*kdcache verify",
    "truncated shard": r"fails its crc32c checksum.*kdcache verify",
    "empty shard": r"labels/c/1 \(samples 32\.\.63\) is empty",
    "missing shard": r"logits/c/2/0/0 \(samples 64\.\.95\) is missing",
    "missing completion record": r"shard_done/c/3 \(shard 3\) is missing",
    "edited manifest": r"manifest in its zarr\.json was edited",
    "wrong format version": r"unknown format version",
    "newer format version": r"newer than this kdcache reads",
    "unreadable array metadata": r"logits/zarr\.json\) is unreadable",
    "deleted manifest": r"store\.zarr",
    "manifest not JSON": r"store\.zarr",
}


@pytest.mark.parametrize("case", READ_CASES)
def test_stage2_and_info_give_one_line(copy, case):
    VERIFY_CASES[case][0](copy)
    stats = one_error_line(run("stats", copy, "--stat", "entropy"))
    assert re.search(READ_CASES[case], stats), stats
    if case not in ("flipped byte in a chunk", "truncated shard"):  # info reads no chunk of logits
        info = one_error_line(run("info", copy))
        assert re.search(READ_CASES[case], info), info


def test_stage2_reading_damaged_statistics_metadata_gives_one_line(copy):
    VERIFY_CASES["unreadable statistics metadata"][0](copy)
    line = one_error_line(run("stats", copy, "--stat", "mlt_temperature"))
    assert "a zarr.json of the cache store is not valid JSON" in line and "kdcache verify" in line


def test_stage3_reading_a_corrupt_chunk_gives_one_line(train_store_cfg, copy, tmp_path):
    from tests.conftest import write_config
    flip_byte(copy / "logits/c/0/0/0", 40)
    cfg = write_config(train_store_cfg, tmp_path / "train.yaml")
    line = one_error_line(run("train", "--config", cfg, "--cache", copy, "--out", tmp_path / "run"))
    assert "fails its crc32c checksum" in line and "kdcache verify" in line


# ---- clean stores ----------------------------------------------------------------------------------

def test_clean_store_verifies(clean):
    summary = verify_store(clean, progress=False)
    assert summary.startswith(f"OK {clean}: 4/4 shards")
    result = run("verify", clean)
    assert result.exit_code == 0 and result.output.strip().splitlines()[-1].startswith("OK ")


def test_spot_check_matches_the_teacher(clean, teacher_ckpt):
    summary = verify_store(clean, spot_check=12, checkpoint=teacher_ckpt, progress=False)
    assert "spot check: 12 (sample, view) pairs match the teacher" in summary


def test_spot_check_catches_permuted_rows(copy, teacher_ckpt):
    from kdcache.store import chunk_crc32c
    a = plain(copy, "logits")
    a[32:64] = a[32:64][::-1]  # valid chunks, finite values
    with pytest.raises(CorruptStore, match=r"logits samples 32\.\.47 are not the rows written there"):
        verify_store(copy, progress=False)  # the digests recorded by stage 1 tell
    digests = plain(copy, "chunk_crc32c")
    digests[2:4, 0] = chunk_crc32c(a[32:64], 32, 16)  # a writer that recorded its wrong rows: only the teacher can tell
    verify_store(copy, progress=False)
    with pytest.raises(CorruptStore, match=r"logits of sample \d+, view \d+ differ from the teacher's by"):
        verify_store(copy, spot_check=40, checkpoint=teacher_ckpt, progress=False)


def test_spot_check_refuses_another_checkpoint(clean, tmp_path):
    other = tmp_path / "other.pt"
    other.write_bytes(b"not the teacher")
    line = one_error_line(run("verify", clean, "--spot-check", 4, "--checkpoint", other))
    assert "has sha256" in line and "give the checkpoint the store was built with" in line


# ---- info ------------------------------------------------------------------------------------------

def test_info_summarises_the_store(clean, train_store_cfg):
    text = run("info", clean).output
    sha = zarr.open_group(str(clean), mode="r").attrs["manifest"]["teacher"]["checkpoint_sha256"]
    for expected in ("tiny_teacher", sha[:12], "synthetic train, N = 128, 4 classes", "crop_flip, 18 of 18 per sample",
                     "128 x 18 = 2304", "logits (128, 18, 4) float16", "complete, 4/4 shards done",
                     "2 arrays, 2 fresh: mlt_temperature_unbiased, wttm_power_sum_gamma0.1"):
        assert expected in text, (expected, text)


def test_info_json_sizes_are_the_files(clean):
    info = json.loads(run("info", clean, "--json").output)
    assert info["bytes_stored"] == sum(f.stat().st_size for f in clean.rglob("*") if f.is_file())
    a = zarr.open_group(str(clean), mode="r")
    assert info["bytes_raw"] == sum(x.nbytes for _, x in a.members(max_depth=None) if isinstance(x, zarr.Array))
    assert info["compression_ratio"] == pytest.approx(info["bytes_raw"] / info["bytes_stored"])


def test_info_shows_stale_and_interrupted_statistics(copy):
    g = zarr.open_group(str(copy), mode="r+")
    g["stats/mlt_temperature_unbiased"].attrs["logits_fingerprint"] = "0" * 64
    del g["stats/wttm_power_sum_gamma0.1"].attrs["logits_fingerprint"]
    stats = store_info(copy)["statistics"]
    assert stats == {"mlt_temperature_unbiased": "stale", "wttm_power_sum_gamma0.1": "incomplete"}
    assert ("2 arrays, 0 fresh: mlt_temperature_unbiased (stale), wttm_power_sum_gamma0.1 (incomplete)"
            in run("info", copy).output)


# ---- top-k stores: the same checks over their arrays ------------------------------------------------

@pytest.fixture(scope="module")
def topk_store(tmp_path_factory, teacher_ckpt):
    """configs/smoke/synthetic.yaml cut to 64 samples, stored as the top 2 of 4 logits (2 shards of 32)."""
    from kdcache.config import load_config
    from kdcache.stages.cache_teacher import cache_teacher
    from tests.conftest import SMOKE
    path = tmp_path_factory.mktemp("topk") / "store.zarr"
    cache_teacher(load_config(SMOKE, {"teacher": {"checkpoint": str(teacher_ckpt)}, "dataset": {"subset": 64},
                                      "cache": {"store": str(path), "topk": 2, "samples_per_chunk": 16}}),
                  progress=False)
    return path


def test_topk_store_verifies_and_its_arrays_are_checked(topk_store, teacher_ckpt, tmp_path):
    assert "spot check: 8 (sample, view) pairs match" in verify_store(topk_store, spot_check=8, checkpoint=teacher_ckpt,
                                                                      progress=False)
    assert "top-2 of the logits" in run("info", topk_store).output
    damaged = tmp_path / "store.zarr"
    shutil.copytree(topk_store, damaged)
    flip_byte(damaged / "rest_logmass/c/1/0", 30)
    with pytest.raises(CorruptStore, match=r"rest_logmass shard \(1, 0\) \(samples 32\.\.63\) .*fails its crc32c"):
        verify_store(damaged, progress=False)
    shutil.rmtree(damaged)
    shutil.copytree(topk_store, damaged)
    a = plain(damaged, "topk_indices")
    block = a[:32]
    block[3, 1, 0] = 9
    a[:32] = block
    with pytest.raises(CorruptStore, match=r"topk_indices at sample 3, view 1 holds a class outside 0\.\.3"):
        verify_store(damaged, progress=False)
