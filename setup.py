"""longjax: long-context language models in JAX/Flax NNX.

Versions are pinned to the set the test suite was run with (Python 3.11, CPU).
"""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "chex==0.1.92",
    "ml-collections==1.1.0",
    "clu==0.0.12",
    # TensorBoard event files without TensorFlow (clu's own writer needs TF).
    "tensorboardX==2.6.5",
    "absl-py==2.5.1",
    "numpy==2.4.6",
    # Data: tfds without TensorFlow reads array_record through grain.
    "tensorflow-datasets==4.9.10",
    "grain==0.2.18",
    "array-record==0.8.6",
    # tfds stops registering its summarization/translation builders at the
    # first missing optional dependency (nearest_neighbors needs h5py).
    "h5py==3.16.0",
    # tfds' code_path for builders defined in a package needs it.
    "importlib-resources==7.1.0",
    "sentencepiece==0.2.3",
    # Hugging Face checkpoints (longjax.convert), read one tensor at a time.
    "safetensors==0.8.0",
    # LoRA adapters (longjax/models/peft.py); Google's quantization / PEFT library.
    "qwix==0.1.8",
    # Evaluation and plots.
    "rouge-score==0.1.2",
    "sacrebleu==2.6.0",
    "matplotlib==3.11.2",
]

EXTRAS = {
    "test": [
        "pytest==9.2.0",
        "pytest-xdist==3.8.0",
        "nbclient==0.11.0",
        "nbformat==5.11.1",
        "ipykernel==7.4.0",
        # The papers' reference code the kinds are tested against: HF's Flax LongT5
        # (4.57.6 is the last release with Flax models).
        "transformers==4.57.6",
    ],
    # The reference forward passes of the HF checkpoint tests (tests/convert/:
    # transformers' PyTorch Llama / Mistral / Qwen2); the CPU build.
    "convert": ["torch==2.13.0"],
    # GPU wheels for jax (CUDA 12); install with `pip install -e .[cuda]`.
    "cuda": ["jax[cuda12]==0.10.2"],
    # TPU runtime; install with `pip install -e .[tpu]`.
    "tpu": ["jax[tpu]==0.10.2"],
    # The viewer for the event files every run writes (tensorboardX writes them; reading
    # needs no TensorFlow either); install with `pip install -e .[tensorboard]`.
    "tensorboard": ["tensorboard==2.21.0"],
}

setup(
    name="longjax",
    version="0.1.0",
    description="Long-context language models in JAX/Flax: local, global, "
    "transient-global, hierarchical and adaptive-span attention.",
    packages=find_packages(include=["longjax", "longjax.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
