"""Packaging facts users rely on: the math, the kernels and the models import without TensorFlow,
JetStream or PyTorch (a GPU box may lack them)."""
import subprocess
import sys


def test_core_modules_do_not_import_heavy_engines():
    code = ("import sys, jackpot_jax.obrs, jackpot_jax.losses, jackpot_jax.config, pallas_kernels, "
            "jackpot_jax.experiments.obrs_simulation, jackpot_jax.models, jackpot_jax.models.hf, jackpot_jax.rollout, "
            "jackpot_jax.data.datasets, jackpot_jax.data.evaluate, jackpot_jax.data.batching, "
            "jackpot_jax.data.prompts, jackpot_jax.data.rewards, jackpot_jax.data.metrics; "
            "heavy = [m for m in ('tensorflow', 'jetstream', 'tensorflow_datasets', 'seqio', 'torch', 'transformers') "
            "if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]


def test_kernels_import_nothing_of_jackpot_jax():
    """pallas_kernels depends on JAX alone (imports run downward: kernels <- models <- ... <- train)."""
    code = ("import sys, pallas_kernels, pallas_kernels.logspace; "
            "above = [m for m in sys.modules if m.split('.')[0] == 'jackpot_jax']; "
            "print(above); sys.exit(1 if above else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
