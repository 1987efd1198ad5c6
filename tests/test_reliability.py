"""Issue 7's fixes that the bad-input table does not show: what --overwrite says it deletes, the one
atomic-write helper, and that the error line is the last thing a real process prints."""
import subprocess
import sys

import pytest

from kdcache.files import write_atomic
from tests.conftest import REPO, SMOKE, write_config
from tests.test_bad_input import run


def test_overwrite_names_the_kdcache_store_it_deletes(tmp_path, teacher_ckpt):
    from kdcache.config import load_config
    from kdcache.store import CacheStore
    cfg = load_config(SMOKE, {"teacher": {"checkpoint": str(teacher_ckpt)}, "dataset": {"subset": 64},
                              "cache": {"store": str(tmp_path / "cache.zarr")}})
    assert run(["cache-teacher", "--config", write_config(cfg, tmp_path / "a.yaml")])[0] == 0
    cfg["views"]["seed"] = 1  # another manifest
    code, lines, _, crashed = run(["cache-teacher", "--config", write_config(cfg, tmp_path / "b.yaml"), "--overwrite"])
    assert code == 0 and crashed is None, lines
    assert any(line.startswith(f"--overwrite: deleting the cache store {tmp_path / 'cache.zarr'} (status complete; "
                               "teacher tiny_teacher, data set synthetic)") for line in lines), lines
    assert CacheStore.open(tmp_path / "cache.zarr").manifest["views"]["seed"] == 1


def test_write_atomic_replaces_whole_files_and_leaves_no_temporary_file(tmp_path):
    write_atomic(tmp_path / "a.json", "old")
    write_atomic(tmp_path / "a.json", b"new")
    assert (tmp_path / "a.json").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    with pytest.raises(TypeError):
        write_atomic(tmp_path / "a.json", 5)  # fails after the temporary file was made
    assert (tmp_path / "a.json").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_one_atomic_write_helper():
    """Every writer that renames a temporary file into place goes through kdcache.files.write_atomic."""
    users = [p for p in [*REPO.glob("pipeline/*.py"), *REPO.glob("stages/*.py")]
             if "os.replace(" in p.read_text() or "mkstemp(" in p.read_text()]
    assert [p.name for p in users] == ["files.py"]


PENDING = """
import asyncio
from kdcache.stages.cli import cli
from kdcache.errors import UserError

@cli.command("fail-pending")
def fail_pending():
    # what a read of a damaged store can leave: a task of an event loop still pending when the error ends it
    loop = asyncio.new_event_loop()
    loop.create_task(asyncio.sleep(3600))
    loop.run_until_complete(asyncio.sleep(0))
    raise UserError("the store is damaged")

cli(["fail-pending"], prog_name="kdcache")
"""


def test_the_error_line_is_the_last_thing_printed():
    proc = subprocess.run([sys.executable, "-c", PENDING], cwd=REPO, capture_output=True, text=True, timeout=120)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 1 and lines == ["Error: the store is damaged"], lines
