from setuptools import find_packages, setup

# Discovered, never listed by hand (a hand list once left fastm2d.eval out of every wheel). The kernels are the
# package fastm2d.kernels (fastm2d/kernels/); the top-level kernels/ only shows them (links, no __init__.py), so
# nothing installs or imports as a bare `kernels`.
PACKAGES = find_packages(include=["fastm2d", "fastm2d.*"])

setup(
    name="fastm2d",
    version="0.1.0",
    description="Fast, tested pre-training and transfer of Masked Modeling Duo (M2D / M2D-X) audio representations",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_data={"fastm2d": ["assets/*.csv", "assets/README.md"]},  # AudioSet's class names (source and licence inside)
    install_requires=[
        "torch==2.11.0",
        "torchaudio==2.11.0",
        "torchvision==0.26.0",  # timm imports it; other versions fail with 'torchvision::nms does not exist'
        "timm>=1.0",
        "numpy",
        "soundfile>=0.12",
        "soxr>=0.3",  # resampling awkward rates (8009 Hz ...) in bounded memory
        "omegaconf>=2.3",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "matplotlib",  # fastm2d report
        "safetensors",  # pickle-free weights (export --format safetensors)
        "scikit-learn",  # the evaluation's mAP
        "scipy",  # the evaluation's confidence intervals; polyphase resampling checks
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-benchmark>=4", "wheel", "psutil", "nvidia-dali-cuda130==2.4.0",
                 "deepspeed==0.19.8", "transformers>=4.40", "onnx", "onnxscript", "onnxruntime",
                 "import-linter>=2.1", "webdataset>=1.0.2",  # the layer contracts in pyproject.toml; shards
                 "xares==0.1.3"],  # X-ARES's own runner runs the exported encoder file
        "clap": ["transformers>=4.40"],  # M2D-CLAP zero-shot: the text encoders
        "onnx": ["onnx", "onnxscript", "onnxruntime"],  # export --format onnx, and running it
        "dali": ["nvidia-dali-cuda130==2.4.0"],
        "shards": ["webdataset>=1.0.2"],  # training streamed from tar shards (local, http(s)://, pipe:)
        "deepspeed": ["deepspeed==0.19.8"],
        "xformers": ["xformers==0.0.35"],
    },
    entry_points={"console_scripts": ["fastm2d=fastm2d.cli:main"]},
)
