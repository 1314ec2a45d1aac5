"""Packaging for sha_rnn_kernels.

This file must never import torch: installing the package builds nothing. The CUDA sources in
``csrc/`` ship as package data and are compiled on first use on a GPU machine
(``torch.utils.cpp_extension.load`` with ninja), see ``sha_rnn_kernels/_cuda.py``.
"""

import glob
import os
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def _read(name: str) -> str:
    with open(os.path.join(HERE, name), encoding="utf-8") as f:
        return f.read()




class BuildPyWithCsrc(build_py):
    """Copy the top-level csrc/ sources into the built package as sha_rnn_kernels/csrc/.

    Nothing is compiled here: the CUDA extension is built on first use on a GPU machine.
    """

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "sha_rnn_kernels", "csrc")
        os.makedirs(target, exist_ok=True)
        for pattern in ("*.cu", "*.cuh", "*.cpp", "*.h"):
            for path in glob.glob(os.path.join(HERE, "csrc", pattern)):
                shutil.copy2(path, target)


setup(
    name="sha_rnn_kernels",
    version="0.1.0",
    description="Fused GPU kernels (Triton and CUDA) for the SHA-RNN language model",
    long_description=_read("README.md"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=find_packages(include=["sha_rnn_kernels", "sha_rnn_kernels.*"]),
    # csrc/ lives at the top of the repository; BuildPyWithCsrc copies it into the package so
    # that an installed wheel carries the sources the JIT build needs.
    cmdclass={"build_py": BuildPyWithCsrc},
    install_requires=[
        "torch>=2.4",
        "triton>=3.2; platform_system == 'Linux'",
        "numpy",
        "tqdm",
        # config.json + model.safetensors: the shareable model format (loading it runs no code).
        "safetensors",
        # The CUDA LSTM extension is JIT-built with torch.utils.cpp_extension, which needs ninja.
        "ninja",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis"],
        "dev": ["pytest", "pytest-benchmark", "hypothesis", "ruff", "matplotlib"],
        "bench": ["matplotlib"],
    },
    entry_points={
        "console_scripts": [
            "sha-rnn-train=sha_rnn_kernels.train:main",
            "sha-rnn-generate=sha_rnn_kernels.generate:main",
            "sha-rnn-evaluate=sha_rnn_kernels.evaluate:main",
            "sha-rnn-check=sha_rnn_kernels.check:main",
            "sha-rnn-export=sha_rnn_kernels.export:main",
        ]
    },
)
