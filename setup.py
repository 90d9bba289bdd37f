"""Install stalwart: `pip install -e .[dev,hf,offload]` (the Makefile does this)."""

from setuptools import find_packages, setup

setup(
    name="stalwart",
    version="0.1.0",
    description="Fault-tolerant distributed training for PyTorch on Ray: in-memory erasure-coded "
    "snapshots, NVMe offload, low-precision training and RL with verifiable rewards.",
    python_requires=">=3.11",
    packages=find_packages(include=["stalwart", "stalwart.*"]),
    install_requires=[
        "torch>=2.13,<2.15",
        "numpy>=1.26",
        "ray[default]>=2.40",
        "pydantic>=2.6",
        "PyYAML>=6.0",
        "pyarrow>=15",
        "safetensors>=0.4",
        "xxhash>=3.4",
        "zfec>=1.5",
        "ml_dtypes>=0.5",
        "matplotlib>=3.8",
        "scipy>=1.11",
        "tqdm>=4.66",
    ],
    extras_require={
        "hf": ["transformers>=4.45"],
        "offload": ["deepspeed>=0.16"],
        "tensorboard": ["tensorboard>=2.15"],
        "dev": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "hypothesis>=6.100",
            "ruff>=0.6",
            "psutil>=5.9",
        ],
    },
    entry_points={"console_scripts": ["stalwart=stalwart.launch.cli:main"]},
)
