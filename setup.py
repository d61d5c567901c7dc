"""switchjax: Switch Transformers (sparse Mixture-of-Experts) in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="switchjax",
    version="0.1.0",
    description="Switch Transformers (sparse Mixture-of-Experts) in JAX/Flax",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["switchjax", "switchjax.*"]),
    python_requires=">=3.11",  # jax>=0.8.1 and flax>=0.12.3 require it
    # Lower bounds: the fast tests pass with every package at its bound together
    # (Python 3.11; command, pip freeze and the older versions that fail: docs/install.md).
    install_requires=[
        "jax>=0.8.1",
        "flax>=0.12.3",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11.17",
        "tensorflow-datasets>=4.9.10",
        "importlib_resources",  # tfds 4.9.10 imports it without declaring it
        "ml-collections>=1.0",
        "grain>=0.2.13",
        "array_record>=0.8.1",
        "sentencepiece>=0.2.3",
        "tensorboardX>=2.6.1",
        "matplotlib>=3.8.4",
        "numpy>=2.0",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.6", "nbclient>=0.10", "nbformat>=5.10",
                 "ipykernel>=6"],
        "tf": ["tensorflow-cpu>=2.16"],
        "notebooks": ["nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6"],
        "hf": ["torch>=2.4", "transformers>=4.45", "safetensors>=0.4"],
        # The XLA:TPU compiler, to compile for TPU slices from any host (docs/tpu.md): the
        # libtpu that jax[tpu]==0.10.2 pins, with that jax.
        "tpu": ["jax==0.10.2", "jaxlib==0.10.2", "libtpu==0.0.42.*"],
    },
)
