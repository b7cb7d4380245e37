"""speechsum: RL-enhanced speech summarization for multimodal LLMs, from scratch in PyTorch.

Install with ``pip install -e .`` (core) or ``pip install -e .[dev]`` (tests).
torch is deliberately unpinned here; the CI / test path pins it through
``constraints/test.txt`` so that a CPU machine never downloads a CUDA build.
"""
from setuptools import find_packages, setup

setup(
    name="speechsum",
    version="0.1.0",
    description="SFT, on-policy KD and DPO for speech summarization with a Phi-4-multimodal-style model",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["model*", "losses*", "api*", "train*", "rollout*", "eval*", "data*", "toy*"]),
    install_requires=[
        "torch>=2.4",
        "numpy",
        "safetensors",
        "sentencepiece",
        "openai",
        "soundfile",
        "tomli; python_version < '3.11'",  # train/config.py: tomllib is in the standard library from 3.11
    ],
    extras_require={
        # tomli: the Python 3.10 config path is tested; tensorboard: its metrics sink is (W&B's through a stand-in)
        "dev": ["pytest", "transformers>=5.0", "peft", "tomli", "tensorboard"],
        "phi4mm": ["tokenizers"],
        "audio": ["torchaudio"],
        "demo": ["matplotlib"],  # the plots of eval.run and make demo (skipped with a note without it)
        "tensorboard": ["tensorboard"],  # run.tensorboard = true (train/metrics.py)
        "wandb": ["wandb"],  # run.wandb_project = "..." (train/metrics.py)
    },
)
