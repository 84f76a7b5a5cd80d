"""The target encoder scores through dense per-key arrays where a group's key space is small
and through a hash index where it is not; both must give the same numbers, for seen and
unseen levels alike."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd

from rtb.models import encoders
from rtb.models.encoders import SmoothedTargetEncoder


def _frame(rows: int, seed: int, levels: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "campaign": rng.integers(0, levels, rows).astype(str),
            "country": pd.Series(rng.choice(["US", "DE", "BR", "__missing__"], rows)).astype("category"),
        }
    )


def test_dense_and_hashed_lookups_agree(monkeypatch) -> None:
    train, test = _frame(20_000, 0, 300), _frame(5_000, 1, 400)  # test has unseen campaigns
    y = (np.random.default_rng(2).random(len(train)) < 0.05).astype(int)
    encoder = SmoothedTargetEncoder(crosses=(("campaign", "country"),)).fit(train, y)

    dense = pickle.loads(pickle.dumps(encoder)).transform(test)
    monkeypatch.setattr(encoders, "DENSE_MAX_KEYS", 0)
    hashed = pickle.loads(pickle.dumps(encoder)).transform(test)

    np.testing.assert_array_equal(dense, hashed)
    unseen = ~test["campaign"].isin(set(train["campaign"])).to_numpy()
    assert unseen.any()
    prior = np.float32(np.log(encoder.prior_ / (1 - encoder.prior_)))
    assert (dense[unseen, 0] == prior).all() and (dense[unseen, 1] == 0).all()
