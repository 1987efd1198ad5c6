"""benchmarks/bench_frontier.py: its measurements against their definitions, and a tiny run of the script."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_frontier as bf  # noqa: E402
import bench_topk  # noqa: E402


@pytest.fixture(scope="module")
def rows():
    """(n, V, K) teacher-like float32 logits and labels at K = 50."""
    z, y, _ = bf.teacher_like_rows(16, 8, 50)
    return z, y


def test_rows_have_the_stated_confidence_and_leave_bench_topk_alone():
    z, _, tau = bf.teacher_like_rows(64, 10, 100)
    top1 = torch.softmax(torch.from_numpy(z.reshape(-1, 100)).double(), -1).max(-1).values.mean().item()
    assert abs(top1 - bf.TARGET_TOP1) < 0.02 and tau > 1  # fewer classes than 1000: cooled to the same confidence
    assert bench_topk.K == 1000


def test_kd_gradients_are_the_formula():
    g = torch.Generator().manual_seed(0)
    z_s, z_t = torch.randn(5, 7, generator=g, dtype=torch.float64), 3 * torch.randn(5, 7, generator=g, dtype=torch.float64)
    for T in (1, 4):
        want = T * (torch.softmax(z_s / T, -1) - torch.softmax(z_t / T, -1))  # d/dz_s of T^2 KL(p_T || s_T)
        torch.testing.assert_close(bf.kd_gradients(z_s, z_t, T), want, rtol=1e-12, atol=1e-14)


def test_lossless_decoding_scores_zero_kl_and_cosine_one(rows, tmp_path):
    z, y = rows
    full = z.reshape(-1, z.shape[-1])
    features = torch.randn(len(full), 4, dtype=torch.float64)
    student = bf.student_logits(full)
    for dtype, lossless in (("float32", True), ("float16", False)):
        store = bf.write_store(tmp_path / f"{dtype}.zarr", z, y, {"dtype": dtype})
        decoded = bf.decode_logits(bf.read_parts(store), 50).reshape(full.shape)
        got = bf.dense_fidelity(full, decoded, student, features)
        for T in (1, 4):
            if lossless:
                assert got[f"T{T}"]["kl_mean"] == 0
                assert got[f"T{T}"]["grad_cosine_mean"] == pytest.approx(1, abs=1e-12)
                assert got[f"T{T}"]["head_grad_cosine_mean"] == pytest.approx(1, abs=1e-12)
            else:  # float16 rounding: small but not nothing
                assert 0 < got[f"T{T}"]["kl_mean"] < 1e-5 and got[f"T{T}"]["grad_cosine_mean"] < 1


def test_cosine_of_tiny_gradients_is_not_eaten_by_an_eps():
    a = torch.tensor([[1e-12, -1e-12, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    np.testing.assert_allclose(bf.cosine(a, a).numpy(), [1, 1])
    np.testing.assert_allclose(bf.cosine(a[:1], -a[:1]).numpy(), [-1])


def test_narrow_quantization_is_within_half_a_step(rows):
    z, _ = rows
    for bits in (4, 6, 12):
        parts = bf.narrow_quantized(z, bits)
        assert parts["quant_codes"].max() == 2**bits - 1  # the row min is the last level
        err = np.abs(bf.decode_logits(parts, 50) - z)
        assert np.all(err <= parts["quant_step"][..., None] / 2 * (1 + 1e-5) + 1e-6)


def test_sampled_loss_estimate_is_unbiased(rows):
    z, _ = rows
    full = z.reshape(-1, z.shape[-1])
    entry = bf.encodings.logits_entry({"encoding": {"sampled": 4, "temperature": 1, "seed": 0}}, 50)
    parts = bf.encode_logits(z, entry, np.arange(len(z)))
    got = bf.sampled_fidelity(z, parts, bf.student_logits(full), torch.randn(len(full), 4, dtype=torch.float64),
                              entry, repeats=32)["T1"]
    assert abs(got["loss_rel_bias"]) < 4 * got["loss_rel_bias_stderr"]
    assert got["grad_cosine_mean"] < got["grad_cosine_mean_of_draws"] < 1  # averaging draws closes in on the gradient


@pytest.mark.slow
def test_tiny_run_writes_the_table_and_plot(tmp_path):
    """A real run of the script on K = 100 and the K = 21843 storage rows (a few samples, two settings a family)."""
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_frontier.py"), "--classes", "100",
                          "--samples", "16", "--storage-samples", "2", "--quick", "--out", str(tmp_path)],
                         check=False, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    results = json.loads((tmp_path / "frontier.json").read_text())
    assert (tmp_path / "frontier.png").stat().st_size > 0
    by = {(r["family"], r["setting"]): r for r in results["K"]["100"]["settings"]}
    assert by[("dense", "float32")]["T4"]["kl_mean"] == 0
    assert by[("dense", "float16")]["bytes_per_row"] < by[("dense", "float32")]["bytes_per_row"] <= 4 * 100 + 8
    assert by[("top-k", "k=1")]["T4"]["kl_mean"] > by[("top-k", "k=2")]["T4"]["kl_mean"] > 0
    assert "| 100 | dense | float32 |" in run.stdout
    big = {r["setting"]: r["bytes_per_row"] for r in results["K"]["21843"]["settings"] if r["family"] == "dense"}
    assert big["float16"] > 21843  # K = 21843 measured directly, not extrapolated
