"""Request and response schemas, built from the dataset config's column roles.

A request row is the raw test-file row: every field but the timestamp may be absent or null
(a gap, as an empty CSV cell). Rows are validated into plain dicts (a TypedDict), not model
instances, because the compiled scorer reads dicts and the hot path should not build
objects it throws away.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, NotRequired, Required

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, with_config
from typing_extensions import TypedDict

from rtb.dataset_config import DatasetConfig

# Largest float64 that still rounds to a finite float32 (the processed frame is float32).
FLOAT32_LIMIT = 3.4028235677973366e38
Number = Annotated[
    float,
    Field(allow_inf_nan=False, gt=-FLOAT32_LIMIT, lt=FLOAT32_LIMIT,
          description="A count; null or absent when unknown."),
]
Text = Annotated[str | int, Field(description="A category; ints are read as their digits.")]


def row_type(cfg: DatasetConfig) -> type:
    """TypedDict of one raw request row for this dataset config."""
    fields: dict[str, Any] = {}
    if cfg.id:
        fields[cfg.id] = NotRequired[Text | None]
    fields[cfg.timestamp] = Required[
        Annotated[datetime, Field(description="ISO 8601, e.g. 2019-01-09 21:20:15.943000+00:00"
                                              "; without an offset it is UTC.")]
    ]
    for name in cfg.categorical:
        fields[name] = NotRequired[Text | None]
    for name in cfg.numerical:
        fields[name] = NotRequired[Number | None]
    for name in cfg.datetimes:
        fields[name] = NotRequired[datetime | None]
    row = TypedDict("RawRequest", fields, total=False)  # type: ignore[operator]
    return with_config(ConfigDict(extra="ignore", title="RawRequest"))(row)


class PredictResponse(BaseModel):
    """Probabilities of install, in request order, and the model version that produced them."""

    model: str = Field(description="Version of the model that scored the request.")
    probabilities: list[float]


def adapters(cfg: DatasetConfig, max_batch: int) -> tuple[TypeAdapter, TypeAdapter, type]:
    """(one row, list of rows) adapters; the list carries the batch cap as max_length."""
    row = row_type(cfg)
    batch = Annotated[list[row], Field(min_length=1, max_length=max_batch)]  # type: ignore[valid-type]
    return TypeAdapter(row), TypeAdapter(batch), row


def request_body_schema(cfg: DatasetConfig, max_batch: int) -> dict[str, Any]:
    """OpenAPI request body for POST /predict: one row or a list of rows."""
    row = TypeAdapter(row_type(cfg)).json_schema()
    example = {
        (cfg.id or "id"): "5c3d228defaf187a0721c8e8",
        cfg.timestamp: "2019-01-15 00:00:13.419000+00:00",
    }
    return {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "anyOf": [
                        row,
                        {"type": "array", "items": row, "minItems": 1, "maxItems": max_batch},
                    ]
                },
                "example": example,
            }
        },
    }
