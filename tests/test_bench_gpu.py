"""bench/gpu.py --smoke: the GPU benchmark's code on CPU, on the path a run takes (#24.4).

What it must measure there is checked against hand counts on the toy shape (2 layers, 2 KV heads of 16 dims,
vocabulary 1000): the dtypes of weights, AdamW state and KV cache a bf16 run keeps, KV bytes per token,
the decode bound's vocabulary traffic, the head-TF32 A/B.
"""
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import gpu  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_smoke_runs_the_real_path_and_counts_what_it_says(capsys):
    assert gpu.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["smoke"] and result["params"] == 138304
    # float32 masters and AdamW moments, the KV cache in the bf16 compute dtype
    assert result["dtypes"] == {"weights": "torch.float32", "adam_exp_avg": "torch.float32",
                                "kv_cache": "torch.bfloat16"}
    r, = result["rollout"]
    assert (r["rows"], r["resp_len"]) == (8, 16)
    assert r["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 2  # K and V x layers x kv heads x head dim x bf16
    weights = 138304 * 2  # read in the compute dtype
    vocab = 8 * 32 * 1000  # rows x bytes per entry x V
    kv = 8 * 256 * (64 + 16 / 2)
    assert r["step_gb"] * 1e9 == pytest.approx(weights + vocab + kv)
    assert r["vocab_share"] == pytest.approx(vocab / (weights + vocab + kv))
    assert result["long_rollout"]["resp_len"] == 48
    assert [t["head_tf32"] for t in result["training"]] == [False, True]
    assert all(t["seconds_per_update"] > 0 for t in result["training"])
    assert result["head_tf32_drift"]["logp_abs_diff_max"] == 0.0  # TF32 does not exist on a CPU
    assert "| rows |" in out


def test_without_cuda_it_says_so_and_exits_2(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    assert gpu.main([]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
