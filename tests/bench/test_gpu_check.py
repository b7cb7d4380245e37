"""bench/gpu_check.py: its --dry-run (toy sizes on CPU) runs every check and prints one JSON
line with every figure; without CUDA and without --dry-run it refuses with exit status 2."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.py"
BACKENDS = ("flash", "efficient", "cudnn", "math")


def run_script(*arguments: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(SCRIPT), *arguments], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_logit_comparison(figures: dict) -> None:
    assert is_number(figures["max_abs_diff"]) and figures["max_abs_diff"] >= 0
    assert is_number(figures["mean_abs_diff"]) and 0 <= figures["mean_abs_diff"] <= figures["max_abs_diff"]
    assert is_number(figures["argmax_agreement"]) and 0 <= figures["argmax_agreement"] <= 1


def check_roofline(figures: dict) -> None:
    for field in ("step_ms", "tokens_per_s", "achieved_gbs", "fraction_of_peak"):
        assert is_number(figures[field]) and figures[field] > 0, field


def test_dry_run_reports_every_figure(tmp_path):
    out = tmp_path / "gpu" / "gpu_check.json"
    done = run_script("--dry-run", "--out", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == report  # --out holds the same object

    assert report["dry_run"] is True and report["complete"] is True
    assert isinstance(report["device"], str) and report["device"].startswith("cpu")
    assert is_number(report["seconds"]) and report["seconds"] > 0

    accuracy = report["bf16_vs_fp32"]
    check_logit_comparison(accuracy)
    check_logit_comparison(accuracy["autocast"])
    assert is_number(accuracy["logit_std"]) and accuracy["positions"] > 0

    kernels = report["sdpa_kernels"]
    for case in ("causal_no_mask", "padding_mask", "padding_mask_expand_kv"):
        probe = kernels[case]
        assert all(isinstance(probe[name], bool) for name in BACKENDS), probe
        assert probe["math"] is True  # the math backend runs everything
        assert probe["default"] in BACKENDS and probe[probe["default"]] is True
        assert set(probe["why_not"]) == {name for name in BACKENDS if not probe[name]}

    ddp = report["ddp_step"]
    assert ddp["backend"] == "gloo"
    assert is_number(ddp["loss"]) and ddp["loss_finite"] is True and ddp["grads_finite"] is True
    assert is_number(ddp["seconds"]) and ddp["trainable_parameters"] > 0

    decode = report["decode_roofline"]
    check_roofline(decode)
    assert decode["weight_bytes"] > 0 and decode["peak_gbs"] == 3350.0
    assert decode["compiled"] == {"skipped": "skipped (dry run)"}

    sampler = report["sampler_vs_transformers"]
    for field in ("ours_tokens_per_s", "transformers_tokens_per_s", "speedup"):
        assert is_number(sampler[field]) and sampler[field] > 0, field
    assert 0 <= sampler["token_agreement"] <= 1

    kd = report["kd_loss_memory"]
    assert kd["peak_measured"] is False
    for teacher in ("head", "topk"):
        assert is_number(kd[teacher]["loss"]) and kd[teacher]["loss_finite"] is True
        assert kd[teacher]["input_bytes"] > 0 and kd[teacher]["peak_bytes"] is None
    assert kd["naive_logits_bytes"] > kd["chunk_logits_bytes"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the script would run the full check")
def test_without_gpu_refuses_with_status_2():
    done = run_script(timeout=60)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "needs a CUDA GPU" in done.stderr and "--dry-run" in done.stderr
    assert "Traceback" not in done.stderr
