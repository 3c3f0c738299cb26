from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
version = {}
exec((ROOT / "euphonium" / "_version.py").read_text(), version)

# kernels/ sits at the top of the repository (kernels only, no autograd) but is installed as
# euphonium.kernels: a top-level `kernels` module would collide with an existing PyPI package.
PACKAGES = ["euphonium", "euphonium.kernels"]
PACKAGE_DIR = {"euphonium": "euphonium", "euphonium.kernels": "kernels"}
for sub in sorted((ROOT / "euphonium").rglob("__init__.py")):
    name = ".".join(sub.parent.relative_to(ROOT).parts)
    if name not in PACKAGES:
        PACKAGES.append(name)

setup(
    name="euphonium",
    version=version["__version__"],
    description="Fused Triton ops and a thin trainer for online RL (GRPO) of video flow-matching models",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    include_package_data=True,
    package_data={"euphonium": ["assets/**/*", "configs/*.yaml"]},
    install_requires=[
        # Install torch first for your platform (`pip install torch==2.13.0` gives the CPU wheel on
        # machines that have it on disk); an unpinned torch here would pull a multi-GB CUDA build.
        # Triton 3.4 is the oldest whose tl.randint stream the CPU path reproduces (3.3's differs) and
        # whose ahead-of-time compile API kernels/aot.py uses (3.2 lacks it); torch 2.8 is the first
        # CUDA build that accepts it (each pins one Triton).
        "torch>=2.8",
        "triton>=3.4; platform_system == 'Linux'",
        "numpy>=1.24",
        "diffusers>=0.33",
        "transformers>=4.48",
        "tokenizers>=0.20",
        "peft>=0.14",
        "safetensors>=0.4",
        "pyyaml>=6",
        "tqdm>=4.66",
        "tensorboard>=2.15",
        "matplotlib>=3.8",
        "imageio>=2.34",
        "imageio-ffmpeg>=0.5",
        "pillow>=10",
    ],
    extras_require={
        "dev": [
            "ruff>=0.6",
            "pytest>=8",
            "pytest-benchmark>=4",
            "pytest-xdist>=3.5",
            "hypothesis>=6.100",
            "scipy>=1.11",
            "wandb>=0.17",
        ],
        "gpu": ["flash-attn>=2.6", "xformers>=0.0.28"],
        "wandb": ["wandb>=0.17"],
    },
)
