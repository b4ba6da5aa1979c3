import os
import zlib

# 8 fake CPU devices for the sharding tests; set before anything imports JAX.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import numpy as np
import pytest
from hypothesis import settings

from tests import reference

# Property tests: 40 examples each by default (CI); `make test-slow` runs 2,000 each.
settings.register_profile("default", max_examples=40, deadline=None)
settings.register_profile("thorough", max_examples=2000, deadline=None)
settings.load_profile("default")

VOCABS = (2, 3, 17, 1000, 32768)

# `make test` runs each file whole in one of two pytest-xdist processes, handing out the files in
# collection order: the longest files (1.5-3 min each on 2 CPU cores) go first, so that no process
# is left alone with a long file at the end.
LONGEST_FIRST = ("test_train_resume.py", "test_kernels.py", "test_rollout.py", "test_train_step.py",
                 "test_controller.py", "test_parallel.py", "test_obrs_theorems.py", "test_serve.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file keeps its order


def random_log_dists(rng, lead_shape, vocab, *, scale=3.0, padded=0, tiny=0):
    """Random log-distributions ``[*lead_shape, vocab]`` (float64), LLM-like peaky at scale 3.

    ``padded`` trailing columns are ``-inf`` (a padded vocabulary); ``tiny`` random entries per row
    get probability around 1e-35 (near-zero p_inf).
    """
    logits = scale * rng.standard_normal((*lead_shape, vocab))
    if tiny:
        rows = logits.reshape(-1, vocab)
        for row in rows:
            row[rng.choice(vocab - padded, size=min(tiny, vocab - padded - 1), replace=False)] = -80.0
    if padded:
        logits[..., vocab - padded:] = -np.inf
    return reference.log_softmax(logits)


@pytest.fixture
def rng(request):
    """A NumPy generator seeded from the test's name, so every test is reproducible."""
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))
