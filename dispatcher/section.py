"""The base of every section's model in the config: unknown keys are errors, values are frozen, and each key's
docstring is its description in the JSON Schema."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)
