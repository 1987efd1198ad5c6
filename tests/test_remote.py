"""Stores at URLs, against real servers on loopback: an S3-compatible server (moto's server mode) for
writing and reading, a plain HTTP server for read-only use with a statistics overlay."""
import functools
import http.server
import io
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from kdcache.stages.cli import cli
from kdcache.errors import UserError
from kdcache.sharing import OVERLAY_FORMAT, open_overlay, writer_lock
from kdcache.store import CacheStore
from kdcache.stages.cache_teacher import cache_teacher
from kdcache.stages.compute_stats import compute_stats, read_stat
from kdcache.stages.train_student import train_student
from tests.conftest import REPO, write_config

STATS = ("mlt_temperature", "wttm_power_sum")


# ---- servers ----------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def s3():
    """A moto S3 server on 127.0.0.1 with a bucket 'team'; credentials and endpoint in the environment, as
    a user sets them for any S3-compatible service (botocore reads them)."""
    pytest.importorskip("s3fs")
    ThreadedMotoServer = pytest.importorskip("moto.server").ThreadedMotoServer
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "kdcache-test", "AWS_SECRET_ACCESS_KEY": "kdcache-test",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs
    s3fs.S3FileSystem.clear_instance_cache()  # file systems made under another AWS_ENDPOINT_URL
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir("team")
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """SimpleHTTPRequestHandler plus single byte ranges ('bytes=a-b', 'a-', '-n'), which every production
    server (nginx, Apache, object stores) answers and sharded Zarr stores need."""

    def send_head(self):
        path = self.translate_path(self.path)
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        if not match or not os.path.isfile(path) or match.groups() == ("", ""):
            return super().send_head()
        size = os.path.getsize(path)
        a, b = match.groups()
        if a == "":
            start, end = max(0, size - int(b)), size - 1
        else:
            start, end = int(a), min(int(b) if b else size - 1, size - 1)
        if start > end:
            self.send_error(416)
            return None
        with open(path, "rb") as f:
            f.seek(start)
            body = f.read(end - start + 1)
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return io.BytesIO(body)

    def log_message(self, *args):
        pass


class PlainHandler(http.server.SimpleHTTPRequestHandler):
    """Python's own file server: it ignores Range headers (legal HTTP, but useless for sharded stores)."""

    def log_message(self, *args):
        pass


def serve(folder, handler):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def http_store(train_store_cfg, tmp_path_factory):
    """The smoke train store (with its in-store statistics removed: a published cache without them),
    served read-only over HTTP; yields (url, local copy)."""
    folder = tmp_path_factory.mktemp("www")
    local = folder / "cache.zarr"
    shutil.copytree(train_store_cfg["cache"]["store"], local)
    shutil.rmtree(local / "stats")
    server = serve(folder, RangeHandler)
    yield f"http://127.0.0.1:{server.server_port}/cache.zarr", local
    server.shutdown()


# ---- helpers ----------------------------------------------------------------------------------------

def copy_cfg(cfg, **cache):
    c = json.loads(json.dumps(cfg))
    c["cache"].update(cache)
    return c


def train(cfg, out, method="mlt", **cache):
    """One epoch of `method` (MLT reads stage-2 statistics); returns (result, per-step losses)."""
    c = copy_cfg(cfg, **cache)
    c["train"].update(method=method, params={}, epochs=1, out=str(out))
    steps = []
    result = train_student(c, progress=False, on_step=lambda s: steps.append((s["loss"], s["ce"], s["kd"])))
    return result, steps


@pytest.fixture(scope="module")
def local_run(train_store_cfg, tmp_path_factory):
    """The reference: the same training from the local store and its in-store statistics."""
    return train(train_store_cfg, tmp_path_factory.mktemp("local_run"))


def arrays(group, names=("logits", "views", "labels", "shard_done")):
    return {n: group[n][...] for n in names}


def invoke(*args):
    """(exit code, output) of the CLI in-process; a user error is one line, never a traceback."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, result.output.strip()


# ---- S3 -----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_s3_store_is_written_computed_and_read_like_a_local_one(s3, train_store_cfg, local_run, tmp_path):
    url = "s3://team/smoke/cache.zarr"
    cfg = copy_cfg(train_store_cfg, store=url)
    remote = cache_teacher(cfg, progress=False)
    local = CacheStore.open(train_store_cfg["cache"]["store"])
    assert remote.status == "complete" and remote.fingerprint() == local.fingerprint()
    for name, value in arrays(local.group).items():
        np.testing.assert_array_equal(arrays(remote.group)[name], value, err_msg=name)

    code, out = invoke("stats", url, "--config", write_config(cfg, tmp_path / "c.yaml"))  # stage 2 into the store
    assert code == 0, out
    remote = CacheStore.open(url)
    for stat, params in (("mlt_temperature", {"std": "unbiased"}), ("wttm_power_sum", {"gamma": 0.1})):
        np.testing.assert_array_equal(read_stat(remote, stat, **params)[...], read_stat(local, stat, **params)[...])

    result, steps = train(train_store_cfg, tmp_path / "run", store=url)
    assert steps == local_run[1] and result["last_accuracy"] == local_run[0]["last_accuracy"]
    assert result["store"] == url and result["store_fingerprint"] == local.fingerprint()
    import s3fs
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    assert not fs.exists("team/smoke/cache.zarr/locks/stats/zarr.json")  # every lock released
    assert not fs.exists("team/smoke/cache.zarr/locks/cache-teacher-0-of-1/zarr.json")


def test_s3_lock_is_exclusive_and_a_stale_one_is_taken_over(s3, capfd):
    """The writer lock on S3: a conditional put, so a second holder is refused; a dead holder's lock is
    taken over; released at the end of the block, also on errors."""
    import s3fs
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    url, key = "s3://team/locked.zarr", "team/locked.zarr/locks/stats/zarr.json"
    with writer_lock(url, "stats"):
        assert json.loads(fs.cat_file(key))["attributes"]["kdcache_lock"]["pid"] == os.getpid()
        with pytest.raises(UserError, match=f"locks/stats held by pid {os.getpid()} on {socket.gethostname()}"):
            with writer_lock(url, "stats"):
                pass
    assert not fs.exists(key)
    with pytest.raises(RuntimeError), writer_lock(url, "stats"):
        raise RuntimeError("the block fails")
    assert not fs.exists(key)

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    fs.pipe_file(key, lock_document(dead.pid))
    with writer_lock(url, "stats"):
        assert json.loads(fs.cat_file(key))["attributes"]["kdcache_lock"]["pid"] == os.getpid()
    assert f"taking over the stale lock locks/stats of pid {dead.pid}" in capfd.readouterr().err


def lock_document(pid, host=None, job=None) -> bytes:
    """A lock as docs/FORMAT.md describes it (what another kdcache process writes)."""
    return json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {"kdcache_lock": {
        "host": host or socket.gethostname(), "pid": pid, "job": job, "command": "kdcache stats s3://team/x.zarr",
        "started": "2026-11-22T09:00:00+00:00"}}}).encode()


def test_s3_missing_bucket_and_store(s3, train_store_cfg, tmp_path):
    for url in ("s3://no-such-bucket/cache.zarr", "s3://team/no-such-store.zarr"):
        code, out = invoke("train", "--config", write_config(train_store_cfg, tmp_path / "c.yaml"), "--cache", url,
                           "--out", tmp_path / "run")
        assert code == 1 and out.splitlines()[-1] == (f"Error: no cache store at {url}: build it with `kdcache "
                                                      "cache-teacher --config ...` (make cache-teacher), or point "
                                                      "--cache at an existing store")


@pytest.mark.slow
def test_two_processes_write_one_s3_store(s3, smoke_cfg, tmp_path):
    """One job of two processes (--num-shards 2) creates and fills one S3 store together, racing to create it."""
    url = "s3://team/two/cache.zarr"
    yaml_path = write_config(copy_cfg(smoke_cfg, store=url), tmp_path / "c.yaml")
    env = dict(os.environ, PYTHONPATH=str(REPO), **s3)
    procs = [subprocess.Popen([sys.executable, "-m", "kdcache.stages.cli", "cache-teacher", "--config", yaml_path,
                               "--num-shards", "2", "--shard-index", str(i)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    for p in procs:
        assert p.wait() == 0, p.stderr.read()[-2000:]
    reference = cache_teacher(smoke_cfg, progress=False)
    store = CacheStore.open(url)
    assert store.status == "complete"
    np.testing.assert_array_equal(store.logits[...], reference.logits[...])


@pytest.mark.slow
def test_unreachable_s3_endpoint_is_one_line(tmp_path, train_store_cfg):
    env = dict(os.environ, PYTHONPATH=str(REPO), AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="x",
               AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=f"http://127.0.0.1:{closed_port()}",
               AWS_MAX_ATTEMPTS="1")
    done = subprocess.run([sys.executable, "-m", "kdcache.stages.cli", "train", "--config",
                           write_config(train_store_cfg, tmp_path / "c.yaml"), "--cache", "s3://team/x.zarr"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: cannot reach s3://team/x.zarr: EndpointConnectionError"), last


# ---- HTTP (read-only) + statistics overlay ------------------------------------------------------------

def test_http_store_with_overlay_trains_like_the_local_store(http_store, train_store_cfg, local_run, tmp_path):
    url, served = http_store
    before = snapshot(served)
    config = write_config(train_store_cfg, tmp_path / "c.yaml")
    code, out = invoke("stats", url, "--config", config)  # a read-only store: stage 2 must be told where to write
    assert code == 1 and "read-only" in out and f"kdcache stats {url} --out OVERLAY.zarr" in out

    overlay = tmp_path / "team-stats.zarr"
    code, out = invoke("stats", url, "--config", config, "--out", overlay)
    assert code == 0 and f"-> overlay {overlay}: computed 2" in out, out
    local = CacheStore.open(train_store_cfg["cache"]["store"])
    group = zarr.open_group(overlay, mode="r")  # plain zarr: the overlay's identity and stats/ layout
    assert group.attrs["format"] == OVERLAY_FORMAT and group.attrs["format_version"] == 1
    assert group.attrs["cache_fingerprint"] == local.fingerprint() and group.attrs["cache"] == url
    for name in local.group["stats"].array_keys():
        np.testing.assert_array_equal(group["stats"][name][...], local.group["stats"][name][...], err_msg=name)
    assert not (overlay / "locks" / "stats").exists()  # released

    result, steps = train(train_store_cfg, tmp_path / "run_overlay", store=url, stats=str(overlay))
    assert steps == local_run[1] and result["last_accuracy"] == local_run[0]["last_accuracy"]
    on_disk = json.loads((tmp_path / "run_overlay" / "result.json").read_text())
    assert on_disk["store"] == url and on_disk["stats_overlay"] == str(overlay)

    # the CLI option is the same config key
    code, out = invoke("train", "--config", config, "--cache", url, "--stats", overlay, "--out", tmp_path / "cli")
    assert code == 0, out
    assert json.loads((tmp_path / "cli" / "result.json").read_text())["stats_overlay"] == str(overlay)
    assert snapshot(served) == before  # consumers never modified the shared store


def snapshot(folder):
    return {str(f): (f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(folder.rglob("*"))}


def test_http_store_without_statistics_names_the_overlay_call(http_store, train_store_cfg, tmp_path):
    url, _ = http_store
    with pytest.raises(UserError, match=re.escape(f"store {url} has no stats/mlt_temperature_unbiased; compute it "
                                                  f"with: kdcache stats {url} --stat mlt_temperature --std unbiased")):
        train(train_store_cfg, tmp_path / "run", store=url)
    overlay = tmp_path / "empty.zarr"
    compute_stats(url, dict(train_store_cfg["stats"], statistics=["entropy"]), out=str(overlay), progress=False)
    with pytest.raises(UserError, match=re.escape(f"statistics overlay {overlay} has no stats/"
                                                  f"mlt_temperature_unbiased; compute it with: kdcache stats {url} "
                                                  f"--out {overlay} --stat")):
        train(train_store_cfg, tmp_path / "run", store=url, stats=str(overlay))


def test_overlay_of_another_cache_is_refused(http_store, train_store_cfg, smoke_cfg, tmp_path):
    url, _ = http_store
    other = cache_teacher(smoke_cfg, progress=False)  # another cache (other samples and views)
    overlay = str(tmp_path / "other-stats.zarr")
    compute_stats(other.path, dict(train_store_cfg["stats"], statistics=["entropy"]), out=overlay, progress=False)
    message = f"statistics overlay {overlay} belongs to another cache (fingerprint {other.fingerprint()[:12]}"
    with pytest.raises(UserError, match=re.escape(message)):
        train(train_store_cfg, tmp_path / "run", method="kd", store=url, stats=overlay)
    with pytest.raises(UserError, match=re.escape(message)):
        compute_stats(url, dict(train_store_cfg["stats"], statistics=["entropy"]), out=overlay, progress=False)
    with pytest.raises(UserError, match="no statistics overlay at"):
        open_overlay(str(tmp_path / "none.zarr"), other.fingerprint(), other.path)


def test_http_store_cannot_be_written(http_store, smoke_cfg, tmp_path):
    url, _ = http_store
    code, out = invoke("cache-teacher", "--config", write_config(smoke_cfg, tmp_path / "c.yaml"), "--out", url)
    assert code == 1 and out.splitlines()[-1] == (f"Error: cannot write cache store {url}: http URLs are read-only; "
                                                  "write to a local path or an object store (s3://, gs://)")


def test_http_server_without_range_requests_is_refused(http_store, train_store_cfg, tmp_path):
    _, local = http_store
    server = serve(local.parent, PlainHandler)
    try:
        url = f"http://127.0.0.1:{server.server_port}/cache.zarr"
        code, out = invoke("stats", url, "--config", write_config(train_store_cfg, tmp_path / "c.yaml"),
                           "--out", tmp_path / "o.zarr")
        assert code == 1 and "ignores Range requests" in out
    finally:
        server.shutdown()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("location, message", [
    ("foo://bucket/cache.zarr", "Error: unknown storage protocol 'foo://' in foo://bucket/cache.zarr: use a local "
                                "path, file://, s3://, gs:// or http(s)://"),
    ("gs://bucket/cache.zarr", "Error: gs://bucket/cache.zarr needs a storage backend that is not installed: "),
    ("http://127.0.0.1:{port}/cache.zarr", "Error: cannot reach http://127.0.0.1:{port}/cache.zarr: "
                                           "ClientConnectorError: Cannot connect to host 127.0.0.1:{port}"),
    ("{http}/missing.zarr", "Error: no cache store at {http}/missing.zarr"),
    ("file:///nonexistent/cache.zarr", "Error: no cache store at file:///nonexistent/cache.zarr"),
])
def test_unreachable_locations_are_one_line_errors(http_store, train_store_cfg, tmp_path, location, message):
    if location.startswith("gs://") and _installed("gcsfs"):
        pytest.skip("gcsfs is installed")
    fill = {"port": closed_port(), "http": http_store[0].rsplit("/", 1)[0]}
    location, message = location.format(**fill), message.format(**fill)
    config = write_config(train_store_cfg, tmp_path / "c.yaml")
    for args in (["stats", location, "--config", config],
                 ["train", "--config", config, "--cache", location, "--out", tmp_path / "run"]):
        code, out = invoke(*args)
        assert code == 1 and out.splitlines()[-1].startswith(message), out


def _installed(module) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


def test_file_urls_are_local_stores(train_store_cfg, tmp_path):
    url = "file://" + str(train_store_cfg["cache"]["store"])
    store = CacheStore.open(url)
    np.testing.assert_array_equal(store.logits[...], CacheStore.open(train_store_cfg["cache"]["store"]).logits[...])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the locks group of a store is an ordinary zarr group to plain readers
        list(zarr.open_group(train_store_cfg["cache"]["store"], mode="r").members(max_depth=None))
