"""megamoe: DeepSeek-V3-style Mixture-of-Experts pretraining on DeepSpeed.

Install order matters (see Makefile): torch first (pinned, the CPU wheel installs offline),
then this package, then deepspeed with --no-build-isolation so it builds against that torch
instead of pulling a multi-GB CUDA build into an isolated build environment.
"""
from setuptools import find_packages, setup

TORCH = "torch==2.13.0"
DEEPSPEED = "deepspeed==0.19.8"

setup(
    name="megamoe",
    version="0.1.0",
    description="Pretrain DeepSeek-V3-style MoE language models (MLA + fine-grained experts) on DeepSpeed",
    python_requires=">=3.10",
    # The repository's kernels/ folder is installed as megamoe.kernels (megamoe/kernels is a link to it):
    # nothing named `kernels` lands in site-packages, where Hugging Face's `kernels` package lives.
    packages=find_packages(include=["megamoe", "megamoe.*"]),
    package_data={"megamoe": ["presets/*.json"]},
    install_requires=[
        TORCH,
        "numpy>=1.26",
        "transformers==5.23.0",
        "safetensors>=0.4",
        "sentencepiece>=0.2",
        "tokenizers>=0.21",
        "tiktoken>=0.8",
        "pyarrow>=15",
        "pyyaml>=6",
        "tqdm>=4.66",
        "tensorboard>=2.16",
        "matplotlib>=3.8",
        "mwparserfromhell>=0.6",     # Wikipedia markup -> text for the demo corpus (megamoe.data.corpus)
    ],
    entry_points={"console_scripts": [
        "megamoe-pretrain=megamoe.pretrain:main",
        *(f"megamoe-{name.replace('_', '-')}=megamoe.cli.{name}:main" for name in (
            "preprocess", "train_tokenizer", "prepare_corpus", "inspect_data", "convert_to_hf", "convert_from_hf",
            "convert_checkpoint", "generate", "evaluate", "serve", "plan")),
    ]},
    extras_require={
        # deepspeed must be installed after torch without build isolation: `make` does that.
        "train": [DEEPSPEED],
        # Triton kernels: the wheel runs under TRITON_INTERPRET=1 on CPU and compiles for CUDA.
        "kernels": ["triton==3.9.0"],
        # GPU only: flash-attn needs CUDA to build.
        "gpu": ["flash-attn>=2.6"],
        # the playground (tools/serve.py)
        "serve": ["gradio>=6.0,<7"],
        # selenium drives the distribution's Chromium in the playground test (no browser download)
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "hypothesis>=6.100", "mutmut==3.8.1", "selenium>=4.20"],
    },
)
