"""Request and response schemas, built from the dataset config's roles and `rtb.field_rules`.

A request row is the raw test-file row: every field but the timestamp may be absent or null
(a gap, as an empty CSV cell); each field follows the rule `rtb make-dataset` applies to
its column, and a field that is not a column is rejected (see `rtb.field_rules`). Rows are
validated into plain dicts (a TypedDict), not model instances, because the compiled scorer
reads dicts and the hot path should not build objects it throws away. Every constraint is
a pydantic constraint, checked in Rust and shown in the OpenAPI document, so that the
document says exactly what is accepted: a schema fuzzer generating requests from it finds
no request the schema allows but the service refuses, nor the other way round.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, NotRequired, Required

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, with_config
from typing_extensions import TypedDict

from rtb.dataset_config import DatasetConfig
from rtb.field_rules import TIMESTAMP_EXAMPLE, field_rules


def row_type(cfg: DatasetConfig) -> type:
    """TypedDict of one raw request row for this dataset config; unknown keys are errors."""
    fields: dict[str, Any] = {}
    for name, rule in field_rules(cfg).items():
        kind = rule.request_type()
        fields[name] = Required[kind] if rule.required else NotRequired[kind]
    row = TypedDict("RawRequest", fields, total=False)  # type: ignore[operator]
    return with_config(ConfigDict(extra="forbid", title="RawRequest"))(row)


UNKNOWN_FIELD = "no such field: only the fields the schema lists"


class PredictResponse(BaseModel):
    """Probabilities of install, in request order, and the arm and model version that
    produced them."""

    model: str = Field(description="Version of the model that scored the request.")
    arm: Literal["champion", "challenger"] = Field(
        description="Which arm answered: the challenger when models/ab.yaml splits traffic "
        "and the request's id (its first row's, for a list) falls in the challenger's share.")
    probabilities: list[float]


class FieldError(BaseModel):
    """One offending field: where it is, what pydantic found, and what was expected."""

    type: str = Field(description="Error kind, e.g. greater_than_equal, extra_forbidden.")
    loc: list[str | int] = Field(description='["body", field] or ["body", row, field].')
    msg: str
    expected: str | None = Field(
        default=None, description="What a valid value of this field is (as make-dataset says).")


class ValidationErrorBody(BaseModel):
    """422: the body failed validation; `detail` has one entry per offending field."""

    detail: list[FieldError]


class MessageBody(BaseModel):
    """A one-line reason (413 too large, 500 internal error)."""

    detail: str


def adapters(cfg: DatasetConfig, max_batch: int) -> tuple[TypeAdapter, TypeAdapter, type]:
    """(one row, list of rows) adapters; the list carries the batch cap as max_length."""
    row = row_type(cfg)
    batch = Annotated[list[row], Field(min_length=1, max_length=max_batch)]  # type: ignore[valid-type]
    return TypeAdapter(row), TypeAdapter(batch), row


def example_row(cfg: DatasetConfig) -> dict[str, Any]:
    """A valid request row for the docs: the id and timestamp (everything else may be a gap)."""
    example: dict[str, Any] = {cfg.timestamp: TIMESTAMP_EXAMPLE}
    if cfg.id:
        example = {cfg.id: "5c3d228defaf187a0721c8e8", **example}
    return example


def request_body_schema(cfg: DatasetConfig, max_batch: int) -> dict[str, Any]:
    """OpenAPI request body for POST /predict: one row or a list of rows."""
    row = TypeAdapter(row_type(cfg)).json_schema()
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
                "example": example_row(cfg),
            }
        },
    }


def error_responses(cfg: DatasetConfig, max_batch: int,
                    max_body_bytes: int) -> dict[int | str, dict[str, Any]]:
    """The non-200 answers of POST /predict, with their bodies and examples, for OpenAPI."""
    counts = [name for name in cfg.numerical if name in cfg.non_negative]
    count = counts[0] if counts else (cfg.numerical[0] if cfg.numerical else cfg.timestamp)
    invalid = {"detail": [
        {"type": "greater_than_equal", "loc": ["body", count],
         "msg": "Input should be greater than or equal to 0",
         "expected": field_rules(cfg)[count].request_expected},
        {"type": "extra_forbidden", "loc": ["body", "unknownField"],
         "msg": "Extra inputs are not permitted", "expected": UNKNOWN_FIELD},
    ]}

    def answer(model: type[BaseModel], description: str, example: object) -> dict[str, Any]:
        return {"model": model, "description": description,
                "content": {"application/json": {"example": example}}}

    return {
        413: answer(MessageBody, f"More than {max_batch} rows (--max-batch) or "
                    f"{max_body_bytes} bytes in one request",
                    {"detail": f"batch too large: at most {max_batch} rows per request "
                               "(--max-batch)"}),
        422: answer(ValidationErrorBody, "The body is not JSON, or fields failed validation: "
                    "one entry per offending field, each naming it and what was expected",
                    invalid),
        500: answer(MessageBody, "An internal error (logged by the service; never a trace)",
                    {"detail": "internal server error"}),
    }


class ReloadAnswer(BaseModel):
    """What POST /reload did (409 when the champion failed to load and the old one serves)."""

    reloaded: bool
    model: str = Field(description="The version serving after the attempt.")
    previous: str | None
    error: str | None
    detail: str
