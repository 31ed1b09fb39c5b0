"""What every model family config shares: frozen, hashable, to and from a JSON dict, checked field by field.

A family config (ViTConfig, EvaConfig, SamConfig) is the single description of one architecture: the
module is rebuilt from it alone, TeacherStack groups teachers by it, and spec.json stores it. What the
tensor shapes cannot tell (an activation, an epsilon) is a field, never guessed at load. Every family
config also answers `img_size`, `patch_size`, `grid`, `width` (the token width `features` returns),
`num_prefix_tokens` (tokens before the patches), `num_tokens`, `summary_dim` (0: no summary) and
`variant` (a short name for humans).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

# Input normalizations the weights were trained with (RGB, on [0, 1] pixels).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP, EVA-02, most OpenCLIP towers
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)  # SigLIP, some OpenCLIP towers: pixels in [-1, 1]

# Field annotation (a string under `from __future__ import annotations`) -> the check of a JSON value.
_TYPES = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
    "str": lambda v: isinstance(v, str),
}
_TYPE_WORDS = {"int": "an integer", "bool": "true or false", "float": "a finite number", "str": "a string"}


class FamilyConfig:
    """Mixin for the frozen dataclass configs of the model families."""

    POSITIVE: tuple[str, ...] = ()  # integer fields that must be > 0 (the other integers: >= 0)

    def problems(self) -> list[str]:
        """'field: what is wrong' for every field of the wrong type or range, then the family's own checks."""
        bad = []
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), str(f.type)
            if kind == "int":
                low, words = (1, "a positive integer") if f.name in self.POSITIVE else (0, "an integer >= 0")
                if not _TYPES["int"](value) or value < low:
                    bad.append(f"{f.name} must be {words}, got {value!r}")
            elif kind in _TYPES and not _TYPES[kind](value):
                bad.append(f"{f.name} must be {_TYPE_WORDS[kind]}, got {value!r}")
            elif kind == "tuple[int, ...]" and not (
                isinstance(value, (tuple, list)) and all(_TYPES["int"](v) for v in value)
            ):
                bad.append(f"{f.name} must be a list of integers, got {value!r}")
        return bad or self.range_problems()

    def range_problems(self) -> list[str]:
        """The family's checks of values against each other (types are already right)."""
        return []

    def check(self) -> None:
        if problems := self.problems():
            raise ValueError(f"{type(self).__name__}: {'; '.join(problems)}")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Any):
        """The config from a JSON dict; one-line ValueError naming missing, unknown or ill-typed fields."""
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__} must be a JSON object, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        required = {n for n, f in fields.items() if f.default is dataclasses.MISSING}
        problems = []
        if missing := sorted(required - set(data)):
            problems.append(f"lacks the fields {missing}")
        if unknown := sorted(set(data) - set(fields)):
            problems.append(f"has unknown fields {unknown}")
        if problems:
            raise ValueError(f"{cls.__name__} {' and '.join(problems)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**values)


def _plain(value):
    return list(value) if isinstance(value, tuple) else value
