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


def test_encoding_tables_reproduce_transform() -> None:
    """What scorers outside sklearn read (`encoding_tables`, keys from `level_codes` and
    `group_keys`) must be the encoder's own numbers, seen and unseen levels alike."""
    train, test = _frame(20_000, 0, 300), _frame(5_000, 1, 400)
    y = (np.random.default_rng(2).random(len(train)) < 0.05).astype(int)
    encoder = SmoothedTargetEncoder(crosses=(("campaign", "country"),)).fit(train, y)
    encoded = encoder.transform(test)
    codes = encoder.level_codes(test)
    tables = encoder.encoding_tables()
    assert [t.columns for t in tables] == encoder.groups()
    for position, table in enumerate(tables):
        keys = encoder.group_keys(codes, table.columns)
        assert keys.tolist() == encoders.mixed_radix_key(
            [codes[c] for c in table.columns], table.radixes).tolist()
        slot = np.searchsorted(table.keys, keys)
        found = (slot < len(table.keys)) & (table.keys[np.minimum(slot, len(table.keys) - 1)] == keys)
        slot = np.minimum(slot, len(table.keys) - 1)
        odds = np.where(found, table.log_odds[slot], table.unseen[0]).astype(np.float32)
        counts = np.where(found, table.log_counts[slot], table.unseen[1]).astype(np.float32)
        np.testing.assert_array_equal(encoded[:, 2 * position], odds)
        np.testing.assert_array_equal(encoded[:, 2 * position + 1], counts)


def test_leave_one_out_encodings_drop_each_rows_own_label() -> None:
    """A training row encoded without itself: its level's installs and rows minus its own,
    with the fitted prior and strength (what a new row of that level would get had the row
    not been there); a level of one row falls back to the prior and a count of 0."""
    train = _frame(6_000, 3, 500)
    train.loc[0, "campaign"] = "only-once"
    y = (np.random.default_rng(4).random(len(train)) < 0.08).astype(int)
    y[0] = 1
    encoder = SmoothedTargetEncoder(crosses=(("campaign", "country"),)).fit(train, y)
    loo = encoder.transform_leave_one_out(train, y)
    full = encoder.transform(train)
    prior = encoder.prior_
    for position, group in enumerate(encoder.groups()):
        key = train[list(group)].astype(str).agg("|".join, axis=1)
        positives = pd.Series(y).groupby(key.to_numpy()).transform("sum").to_numpy() - y
        rows = key.map(key.value_counts()).to_numpy() - 1
        strength = encoder.smoothing_[position]
        rate = (positives + strength * prior) / (rows + strength)
        np.testing.assert_allclose(loo[:, 2 * position], np.log(rate / (1 - rate)), rtol=0, atol=2e-5)
        np.testing.assert_allclose(loo[:, 2 * position + 1], np.log1p(rows), rtol=0, atol=2e-5)
        # A positive row's own label raised its full encoding; without it, it is lower.
        assert (loo[y == 1, 2 * position] < full[y == 1, 2 * position]).all()
    assert loo[0, 0] == np.float32(np.log(prior / (1 - prior))) and loo[0, 1] == 0.0
