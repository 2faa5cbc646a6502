import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never let a test reach for a model hub

import numpy as np
import pytest


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
