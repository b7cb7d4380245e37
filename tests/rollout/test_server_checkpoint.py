"""rollout.server with a damaged checkpoint: one line naming the file, exit status 2, no traceback."""
import subprocess
import sys
from pathlib import Path

from tests.rollout.tiny_checkpoint import build_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def test_a_truncated_checkpoint_is_one_line_naming_the_file(tmp_path):
    checkpoint = build_tiny_checkpoint(tmp_path / "ckpt", seed=0)
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = subprocess.run([sys.executable, "-m", "rollout.server", "--checkpoint", str(checkpoint), "--port", "0"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"{weights}: truncated or not a safetensors file" in result.stderr
