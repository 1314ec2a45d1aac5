"""Packaging for sha_rnn_kernels.

This file must never import torch: installing the package builds nothing. The CUDA sources in
``csrc/`` ship as package data and are compiled on first use on a GPU machine
(``torch.utils.cpp_extension.load`` with ninja), see ``sha_rnn_kernels/_cuda.py``.
"""

import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _read(name: str) -> str:
    with open(os.path.join(HERE, name), encoding="utf-8") as f:
        return f.read()


setup(
    name="sha_rnn_kernels",
    version="0.1.0",
    description="Fused GPU kernels (Triton and CUDA) for the SHA-RNN language model",
    long_description=_read("README.md"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=find_packages(include=["sha_rnn_kernels", "sha_rnn_kernels.*"]),
    # csrc/ lives at the top of the repository; it is mapped into the package so that an
    # installed wheel carries the sources the JIT build needs.
    package_data={"sha_rnn_kernels": ["csrc/*.cu", "csrc/*.cuh", "csrc/*.cpp", "csrc/*.h"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "triton>=3.2; platform_system == 'Linux'",
        "numpy",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis"],
        "bench": ["matplotlib"],
    },
    entry_points={"console_scripts": ["sha-rnn-train=sha_rnn_kernels.train:main"]},
)
