"""Fast, sklearn-compatible encoders for categoricals with tens of thousands of levels.

sklearn's OneHotEncoder maps every value through a Python dict, which dominates the cost of
encoding millions of rows of ids with tens of thousands of levels. These encoders hash
through `pandas.Index`, work on pandas Categorical codes when the input already has them,
and keep their fitted state as plain arrays, which `SmoothedTargetEncoder.encoding_tables`
hands to the table scorers of `rtb.scoring` (batch and per request), so that they need none
of the encoder's internals.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from rtb.models.level_codes import DENSE_MAX_KEYS, fit_vocabulary, lookup_codes, mixed_radix_key
from rtb.models.transforms import sigmoid


@dataclass(frozen=True)
class GroupTable:
    """The fitted encodings of one group (a column, or a cross of columns) as plain arrays.

    A row's key is `mixed_radix_key` of its columns' codes, a code being the level's position
    in that column's vocabulary (`len(vocabulary)`, the radix's last slot, when unseen).
    `keys` are the sorted keys seen in training, `log_odds` and `log_counts` their encodings
    in float64 (transform rounds them to float32); any other key encodes as `unseen`.
    """

    columns: tuple[str, ...]
    vocabularies: tuple[pd.Index, ...]
    radixes: tuple[int, ...]
    keys: np.ndarray
    log_odds: np.ndarray
    log_counts: np.ndarray
    unseen: tuple[float, float]


class SparseOneHotEncoder(TransformerMixin, BaseEstimator):
    """One-hot encode categoricals into a CSR matrix; unseen and rare levels encode as all-zero.

    Equivalent to `OneHotEncoder(handle_unknown="ignore", min_frequency=k)` without the
    infrequent column, at hash-table speed.
    """

    def __init__(self, min_frequency: int = 1) -> None:
        self.min_frequency = min_frequency

    def fit(self, X: pd.DataFrame, y: object = None) -> SparseOneHotEncoder:
        frame = pd.DataFrame(X)
        self.feature_names_in_ = np.asarray(frame.columns, dtype=object)
        self.vocabularies_ = [fit_vocabulary(frame[c], self.min_frequency) for c in frame.columns]
        self.offsets_ = np.cumsum([0] + [len(v) for v in self.vocabularies_])
        return self

    def transform(self, X: pd.DataFrame) -> sp.csr_matrix:
        check_is_fitted(self, "vocabularies_")
        frame = pd.DataFrame(X)
        n_rows = len(frame)
        columns = []
        for position, (name, vocabulary) in enumerate(
            zip(self.feature_names_in_, self.vocabularies_, strict=True)
        ):
            codes = lookup_codes(frame[name], vocabulary)
            columns.append(np.where(codes >= 0, codes + self.offsets_[position], -1))
        stacked = np.stack(columns, axis=1) if columns else np.empty((n_rows, 0), np.int64)
        keep = stacked >= 0
        indices = stacked[keep].astype(np.int32)
        indptr = np.concatenate([[0], np.cumsum(keep.sum(axis=1))]).astype(np.int64)
        data = np.ones(indices.shape[0], dtype=np.float32)
        return sp.csr_matrix((data, indices, indptr), shape=(n_rows, int(self.offsets_[-1])))

    def get_feature_names_out(self, input_features: object = None) -> np.ndarray:
        check_is_fitted(self, "vocabularies_")
        return np.asarray(
            [
                f"{name}={level}"
                for name, vocabulary in zip(self.feature_names_in_, self.vocabularies_, strict=True)
                for level in vocabulary
            ],
            dtype=object,
        )


class SmoothedTargetEncoder(TransformerMixin, BaseEstimator):
    """Empirical-Bayes log-odds and log-frequency for each categorical and each cross of them.

    For a level with n rows and s installs the encoding is logit((s + m * prior) / (n + m)):
    rare ids shrink towards the base rate instead of getting the extreme coefficients a one-hot
    model gives them, and crosses (campaign x country) capture interactions a linear model
    cannot. `fit_transform` encodes each training row with *ordered* statistics, i.e. from
    the rows before it only (CatBoost's ordered target statistics; rows must arrive in time
    order). That is exactly what scoring sees, which only knows the past; out-of-fold
    encodings would instead let a user's own later install leak into their earlier clicks.
    Frequencies are ordered the same way (rows seen before): a level new at scoring time then
    looks like a level's first rows in training, instead of a count of 0 that training never
    showed the model (which sent requests with unseen ids to absurd probabilities).
    With `smoothing="auto"` the prior strength m is estimated per group by empirical Bayes
    (method of moments on a beta-binomial): groups whose levels truly differ get little
    shrinkage, groups that are mostly noise get a lot.
    """

    def __init__(
        self, crosses: tuple[tuple[str, ...], ...] = (), smoothing: float | str = "auto"
    ) -> None:
        self.crosses = crosses
        self.smoothing = smoothing

    def groups(self) -> list[tuple[str, ...]]:
        """The encoded groups in output order: each column alone, then the crosses."""
        return [(name,) for name in self.feature_names_in_] + [tuple(c) for c in self.crosses]

    def level_codes(self, frame: pd.DataFrame) -> dict[str, np.ndarray]:
        """Per input column, each row's position in that column's vocabulary (-1 unseen)."""
        return {
            name: lookup_codes(frame[name], vocabulary)
            for name, vocabulary in zip(self.feature_names_in_, self.vocabularies_, strict=True)
        }

    def group_keys(self, codes: dict[str, np.ndarray], group: tuple[str, ...]) -> np.ndarray:
        """Each row's key in the group's table (see `mixed_radix_key`)."""
        return mixed_radix_key([codes[name] for name in group], [self.radix_[name] for name in group])

    def encoding_tables(self) -> list[GroupTable]:
        """Every group's fitted encodings, in output order, for scorers outside sklearn."""
        check_is_fitted(self, "tables_")
        vocabulary = dict(zip(self.feature_names_in_, self.vocabularies_, strict=True))
        unseen = (float(np.log(self.prior_ / (1.0 - self.prior_))), 0.0)
        return [
            GroupTable(
                columns=tuple(str(name) for name in group),
                vocabularies=tuple(vocabulary[name] for name in group),
                radixes=tuple(int(self.radix_[name]) for name in group),
                keys=np.asarray(keys, dtype=np.int64),
                log_odds=np.asarray(log_odds, dtype=np.float64),
                log_counts=np.asarray(log_counts, dtype=np.float64),
                unseen=unseen,
            )
            for group, (keys, log_odds, log_counts) in zip(self.groups(), self.tables_, strict=True)
        ]

    def fit(self, X: pd.DataFrame, y: np.ndarray) -> SmoothedTargetEncoder:
        self.fit_transform(X, y)
        return self

    def fit_transform(
        self, X: pd.DataFrame, y: np.ndarray | None = None, **_: object
    ) -> np.ndarray:
        if y is None:
            raise ValueError("SmoothedTargetEncoder needs y to fit")
        frame, target = pd.DataFrame(X), np.asarray(y, dtype=np.float64)
        self.feature_names_in_ = np.asarray(frame.columns, dtype=object)
        self.vocabularies_ = [fit_vocabulary(frame[c], 1) for c in frame.columns]
        self.radix_ = {
            name: len(v) + 1
            for name, v in zip(self.feature_names_in_, self.vocabularies_, strict=True)
        }
        self.prior_ = float(np.mean(target))
        codes = self.level_codes(frame)
        self.tables_ = []
        self.smoothing_: list[float] = []
        out = np.empty((len(frame), 2 * len(self.groups())), dtype=np.float32)
        for position, group in enumerate(self.groups()):
            key = self.group_keys(codes, group)
            # One stable sort per group: levels in key order, rows of a level in time order.
            order = np.argsort(key, kind="stable")
            sorted_key, sorted_y = key[order], target[order]
            starts = np.flatnonzero(np.r_[True, sorted_key[1:] != sorted_key[:-1]])
            sizes = np.diff(np.r_[starts, len(key)])
            first = np.repeat(starts, sizes)
            sums_before = np.cumsum(sorted_y) - sorted_y
            n_before = np.empty(len(key))
            s_before = np.empty(len(key))
            n_before[order] = np.arange(len(key)) - first
            s_before[order] = sums_before - sums_before[first]
            totals = np.add.reduceat(sorted_y, starts)
            strength = self._prior_strength(totals, sizes)
            self.smoothing_.append(strength)
            self.tables_.append(
                (sorted_key[starts], self._log_odds(totals, sizes, strength), np.log1p(sizes))
            )
            out[:, 2 * position] = self._log_odds(s_before, n_before, strength)
            out[:, 2 * position + 1] = np.log1p(n_before)
        return out

    def _prior_strength(self, positives: np.ndarray, counts: np.ndarray) -> float:
        """m such that a level's rate is believed as much as m rows of the base rate."""
        if self.smoothing != "auto":
            return float(self.smoothing)
        prior = self.prior_
        rates = positives / counts
        spread = np.sum(counts * (rates - prior) ** 2) / counts.sum()
        noise = len(counts) * prior * (1 - prior) / counts.sum()
        between = max(spread - noise, 1e-12)
        return float(np.clip(prior * (1 - prior) / between, 1.0, 1e5))

    def _log_odds(self, positives: np.ndarray, counts: np.ndarray, strength: float) -> np.ndarray:
        rate = (positives + strength * self.prior_) / (counts + strength)
        return np.log(rate / (1.0 - rate))

    def transform(self, X: pd.DataFrame) -> np.ndarray:
        check_is_fitted(self, "tables_")
        frame = pd.DataFrame(X)
        codes = self.level_codes(frame)
        prior_log_odds = float(np.log(self.prior_ / (1.0 - self.prior_)))
        out = np.empty((len(frame), 2 * len(self.tables_)), dtype=np.float32)
        for position, (group, (levels, log_odds, log_counts)) in enumerate(
            zip(self.groups(), self.tables_, strict=True)
        ):
            key = self.group_keys(codes, group)
            dense = self._dense_tables(position, group, prior_log_odds)
            if dense is not None:  # two gathers, no hashing
                out[:, 2 * position] = dense[0][key]
                out[:, 2 * position + 1] = dense[1][key]
                continue
            slot = self._level_index(position, levels).get_indexer(key)
            found = slot >= 0
            out[:, 2 * position] = np.where(found, log_odds[slot], prior_log_odds)
            out[:, 2 * position + 1] = np.where(found, log_counts[slot], 0.0)
        return out

    def transform_leave_one_out(self, X: pd.DataFrame, y: np.ndarray) -> np.ndarray:
        """Encodings of rows the encoder was fitted on, each from its level's totals without
        the row itself: how a new row of the same levels is encoded, without the row's own
        label in its encodings (which `transform` of a training row includes, and which on a
        level of a few rows, a user's ip say, is most of its encoding).

        The totals are recovered from the fitted encodings; a level whose only row is this
        one encodes as the prior with a count of 0, as an unseen level does."""
        check_is_fitted(self, "tables_")
        frame, target = pd.DataFrame(X), np.asarray(y, dtype=np.float64)
        codes = self.level_codes(frame)
        out = np.empty((len(frame), 2 * len(self.tables_)), dtype=np.float32)
        for position, (group, (levels, log_odds, log_counts)) in enumerate(
            zip(self.groups(), self.tables_, strict=True)
        ):
            slot = self._level_index(position, levels).get_indexer(self.group_keys(codes, group))
            if (slot < 0).any():
                raise ValueError(f"leave-one-out encoding of {'x'.join(group)}: a row's level was "
                                 "not in the rows the encoder was fitted on")
            strength = self.smoothing_[position]
            rows = np.rint(np.expm1(log_counts[slot]))
            rate = sigmoid(log_odds[slot])
            positives = rate * (rows + strength) - strength * self.prior_
            out[:, 2 * position] = self._log_odds(positives - target, rows - 1.0, strength)
            out[:, 2 * position + 1] = np.log1p(rows - 1.0)
        return out

    def _dense_tables(
        self, position: int, group: tuple[str, ...], prior_log_odds: float
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Encodings laid out by key, when a group's key space is small enough (single ids and
        most crosses): scoring becomes an array lookup instead of a hash probe. Built once per
        fitted encoder, not pickled; None for key spaces above DENSE_MAX_KEYS."""
        cache = self.__dict__.setdefault("_dense_cache", {})
        if position not in cache:
            size = int(np.prod([self.radix_[name] for name in group], dtype=np.float64))
            if size > DENSE_MAX_KEYS:
                cache[position] = None
            else:
                levels, log_odds, log_counts = self.tables_[position]
                odds_by_key = np.full(size, prior_log_odds, dtype=np.float32)
                counts_by_key = np.zeros(size, dtype=np.float32)
                odds_by_key[levels] = log_odds
                counts_by_key[levels] = log_counts
                cache[position] = (odds_by_key, counts_by_key)
        return cache[position]

    def _level_index(self, position: int, levels: np.ndarray) -> pd.Index:
        """A hash index of a group's level keys, built once per fitted encoder (not pickled)."""
        cache = self.__dict__.setdefault("_level_index_cache", {})
        if position not in cache:
            cache[position] = pd.Index(levels)
        return cache[position]

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        state.pop("_level_index_cache", None)
        state.pop("_dense_cache", None)
        return state

    def get_feature_names_out(self, input_features: object = None) -> np.ndarray:
        check_is_fitted(self, "tables_")
        names = []
        for group in self.groups():
            label = "x".join(group)
            names += [f"te_{label}", f"logcount_{label}"]
        return np.asarray(names, dtype=object)
