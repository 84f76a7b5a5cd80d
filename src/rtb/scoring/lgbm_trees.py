"""LightGBM trees as generated Python source: nested if/else, compiled once per model.

Why not call the booster: LightGBM's C API has a fixed cost per call, before it looks at a
tree, that is larger than the whole single-row budget. The trees themselves are tiny, so the
ensemble is turned into nested `if`/`else` statements once, at model load, and compiled.

The decision rules copy LightGBM's `Tree::NumericalDecision` (include/LightGBM/tree.h)
exactly, because a value that lands on the other side of one threshold changes the score by
a whole leaf:

- numerical split: left iff `value <= threshold`;
- missing_type None: NaN is treated as 0.0; Zero: NaN and |value| <= 1e-35 take the default
  direction; NaN: NaN takes the default direction (`default_left`).

Categorical splits are rejected: the candidate GBM reads target encodings and counts only,
all numeric, so a model with categorical splits was not built by this project.

Raw scores add tree outputs in tree order, as `GBDT::PredictRaw` does, so the sum is bitwise
the booster's. Dense input values with |value| <= 1e-35 are read by LightGBM as 0.0; callers
zero such values before the trees see them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rtb.scoring.errors import NotTabulable

# LightGBM's kZeroThreshold is the float 1e-35f; comparisons happen in double.
ZERO_THRESHOLD = float(np.float32(1e-35))
MAX_DEPTH = 80  # CPython's tokenizer allows 100 indentation levels.


@dataclass
class Ensemble:
    """All trees of a binary LightGBM model as flat node arrays (leaves point to themselves)."""

    n_features: int
    feature: np.ndarray
    threshold: np.ndarray
    left: np.ndarray
    right: np.ndarray
    is_leaf: np.ndarray
    leaf_value: np.ndarray
    nan_left: np.ndarray  # where NaN goes, after LightGBM's missing-type rules
    zero_default: np.ndarray  # missing_type Zero: |x| <= 1e-35 takes the default direction
    default_left: np.ndarray
    roots: np.ndarray
    depth: int


def parse_booster(booster: object) -> Ensemble:
    """Read `booster.dump_model()` for the iterations `decision_function` uses."""
    best = int(getattr(booster, "best_iteration", 0) or 0)
    dump = booster.dump_model(num_iteration=best if best > 0 else -1)
    if dump.get("num_class", 1) != 1 or dump.get("num_tree_per_iteration", 1) != 1:
        raise NotTabulable("LightGBM model is not a single-output (binary) model")
    if dump.get("average_output"):
        raise NotTabulable("LightGBM random-forest mode (average_output) is not supported")
    trees = [info["tree_structure"] for info in dump["tree_info"]]
    arrays: dict[str, list] = {
        k: []
        for k in (
            "feature", "threshold", "left", "right", "is_leaf", "leaf_value",
            "nan_left", "zero_default", "default_left",
        )
    }
    roots: list[int] = []
    depth = 0

    def add(node: dict, level: int) -> int:
        nonlocal depth
        depth = max(depth, level)
        index = len(arrays["feature"])
        for values in arrays.values():
            values.append(0)
        if "leaf_value" in node:
            if "leaf_coeff" in node:
                raise NotTabulable("LightGBM linear trees are not supported")
            arrays["is_leaf"][index] = True
            arrays["leaf_value"][index] = float(node["leaf_value"])
            arrays["left"][index] = arrays["right"][index] = index
            return index
        arrays["feature"][index] = int(node["split_feature"])
        arrays["default_left"][index] = bool(node.get("default_left", False))
        missing = str(node.get("missing_type", "None"))
        if node["decision_type"] == "==":
            raise NotTabulable(
                "LightGBM categorical splits are not supported (the candidate models split on "
                "numeric encodings only)"
            )
        if node["decision_type"] == "<=":
            threshold = float(node["threshold"])
            arrays["threshold"][index] = threshold
            if missing == "NaN" or missing == "Zero":
                arrays["nan_left"][index] = bool(node.get("default_left", False))
                arrays["zero_default"][index] = missing == "Zero"
            elif missing == "None":
                arrays["nan_left"][index] = 0.0 <= threshold
            else:
                raise NotTabulable(f"LightGBM missing_type {missing!r} is not supported")
        else:
            raise NotTabulable(f"LightGBM decision_type {node['decision_type']!r} is not supported")
        arrays["left"][index] = add(node["left_child"], level + 1)
        arrays["right"][index] = add(node["right_child"], level + 1)
        return index

    for tree in trees:
        roots.append(add(tree, 0))
    if depth > MAX_DEPTH:
        raise NotTabulable(f"a LightGBM tree is {depth} levels deep (compiler limit {MAX_DEPTH})")
    n_features = int(dump.get("max_feature_idx", -1)) + 1
    return Ensemble(
        n_features=n_features,
        feature=np.asarray(arrays["feature"], dtype=np.int64),
        threshold=np.asarray(arrays["threshold"], dtype=np.float64),
        left=np.asarray(arrays["left"], dtype=np.int64),
        right=np.asarray(arrays["right"], dtype=np.int64),
        is_leaf=np.asarray(arrays["is_leaf"], dtype=bool),
        leaf_value=np.asarray(arrays["leaf_value"], dtype=np.float64),
        nan_left=np.asarray(arrays["nan_left"], dtype=bool),
        zero_default=np.asarray(arrays["zero_default"], dtype=bool),
        default_left=np.asarray(arrays["default_left"], dtype=bool),
        roots=np.asarray(roots, dtype=np.int64),
        depth=depth,
    )


def _condition(ens: Ensemble, node: int, var: str) -> str:
    """Python expression that is true when LightGBM sends the row to the left child."""
    t = repr(float(ens.threshold[node]))
    if ens.zero_default[node]:
        zero = f"({var} != {var} or -{ZERO_THRESHOLD!r} <= {var} <= {ZERO_THRESHOLD!r})"
        if ens.default_left[node]:
            return f"({zero} or {var} <= {t})"
        return f"({var} <= {t} and not {zero})"
    if ens.nan_left[node]:
        return f"not {var} > {t}"  # NaN compares false, so it goes left
    return f"{var} <= {t}"


def ensemble_statements(ens: Ensemble, names: list[str], out: str, indent: str) -> list[str]:
    """Statements adding every tree's output to the local `out`, features in locals `names`."""
    if len(names) < ens.n_features:
        raise NotTabulable(
            f"LightGBM model reads {ens.n_features} features, the pipeline gives {len(names)}"
        )
    lines = [f"{indent}{out} = 0.0"]

    def emit(node: int, pad: str) -> None:
        if ens.is_leaf[node]:
            lines.append(f"{pad}{out} += {float(ens.leaf_value[node])!r}")
            return
        var = names[int(ens.feature[node])]
        lines.append(f"{pad}if {_condition(ens, node, var)}:")
        emit(int(ens.left[node]), pad + " ")
        lines.append(f"{pad}else:")
        emit(int(ens.right[node]), pad + " ")

    for root in ens.roots:
        emit(int(root), indent)
    return lines
