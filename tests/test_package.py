"""One import name: the installed package is `kdcache` (folders pipeline/ and stages/), nothing else."""
import os
import subprocess
import sys


def imports(tmp_path, module: str) -> subprocess.CompletedProcess:
    """Import `module` in a fresh interpreter outside the repository, without PYTHONPATH: what a user's
    environment sees after `pip install`."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", f"import {module}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)


def test_kdcache_is_importable_and_pipeline_and_stages_are_not(tmp_path):
    for module in ("kdcache", "kdcache.stages.train_student", "kdcache.stages.cli"):
        assert imports(tmp_path, module).returncode == 0, imports(tmp_path, module).stderr
    for module in ("pipeline", "stages"):
        done = imports(tmp_path, module)
        assert done.returncode == 1 and f"No module named '{module}'" in done.stderr
