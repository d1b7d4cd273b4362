"""scikit-learn's digits (shipped with scikit-learn: no download), preprocessed and split as the bundled models were trained."""
from __future__ import annotations

import numpy as np

N_TRAIN = 1400
SPLIT_SEED = 0


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): pixels / 16, standardized per feature with train statistics,
    a fixed permutation split of 1400 train / 397 test. x is float32 (N, 64), y int64 (N,)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.data.astype(np.float64) / 16.0
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    train, test = order[:N_TRAIN], order[N_TRAIN:]
    mean = x[train].mean(axis=0)
    std = x[train].std(axis=0)
    std[std == 0] = 1.0  # constant border pixels
    x = (x - mean) / std
    return (x[train].astype(np.float32), y[train], x[test].astype(np.float32), y[test])
