"""Age, sex and anatomical site as optional inputs to P(melanoma) (issue 18 §5).

The image model scores pixels only. Where a source records who the patient is (HAM10000: age, sex,
site; ISIC 2017: age, sex), a logistic regression on the image's melanoma logit and those fields
gives a second melanoma probability:

    P(mel | image, age, sex, site) = sigmoid(b + w_image * logit P(mel | image) + w . metadata(age, sex, site))

Every field is optional: the regression is fitted on each validation row with every subset of its
fields hidden (as "unknown"), so a missing field means "not known", not "a typical value". With no
field given there is nothing to add and callers show the image's own probability.

Fitted by `train/fit_metadata.py` on the model's validation predictions (never a test split) and
stored in the model's config.json under `melanoma_metadata_model` (plain numbers, no pickle).
Research/education only, like the image model: no diagnosis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import product
from typing import Any

import numpy as np

CONFIG_KEY = "melanoma_metadata_model"
FIELDS = ("age", "sex", "site")
SEXES = ("male", "female")
#: HAM10000's `localization` values (the sites a fitted model can know), "acral" included.
SITES = (
    "abdomen", "acral", "back", "chest", "ear", "face", "foot", "genital", "hand", "lower extremity", "neck",
    "scalp", "trunk", "upper extremity",
)
UNKNOWN = ("", "unknown", "nan", "none", "na", "n/a")
AGE_CENTRE, AGE_SCALE = 50.0, 20.0
MAX_AGE = 120.0
LOGIT_CLIP = 1e-6

FEATURES = ("image_logit", "age", "age_squared", "age_missing", "sex_male", "sex_female",
            *(f"site_{s.replace(' ', '_')}" for s in SITES))


class MetadataError(ValueError):
    """An age, sex or site value the model cannot read (the message says which values it takes)."""


def parse_age(value: Any) -> float | None:
    """Age in years (0-120) or None for unknown."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        if value.strip().lower() in UNKNOWN:
            return None
        try:
            value = float(value)
        except ValueError:
            raise MetadataError(f"age must be a number of years (0-{MAX_AGE:g}) or empty, got {value!r}") from None
    age = float(value)
    if not 0.0 <= age <= MAX_AGE:
        raise MetadataError(f"age must be between 0 and {MAX_AGE:g} years, got {age:g}")
    return age


def parse_sex(value: Any) -> str | None:
    """"male" / "female" (also m / f, any case) or None for unknown."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip().lower()
    if text in UNKNOWN:
        return None
    text = {"m": "male", "f": "female"}.get(text, text)
    if text not in SEXES:
        raise MetadataError(f"sex must be one of {', '.join(SEXES)} or empty, got {value!r}")
    return text


def parse_site(value: Any) -> str | None:
    """An anatomical site of `SITES` (any case, "_" for spaces) or None for unknown."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip().lower().replace("_", " ")
    if text in UNKNOWN:
        return None
    if text not in SITES:
        raise MetadataError(f"site must be one of {', '.join(SITES)} or empty, got {value!r}")
    return text


@dataclass(frozen=True)
class Metadata:
    """One patient's (optional) fields, validated."""

    age: float | None = None
    sex: str | None = None
    site: str | None = None

    @classmethod
    def parse(cls, age: Any = None, sex: Any = None, site: Any = None) -> Metadata:
        """Raises MetadataError naming the field and the values it takes."""
        return cls(parse_age(age), parse_sex(sex), parse_site(site))

    @property
    def empty(self) -> bool:
        return self.age is None and self.sex is None and self.site is None

    def hide(self, hidden: tuple[bool, bool, bool]) -> Metadata:
        """This record with the fields flagged in `hidden` (age, sex, site) made unknown."""
        age, sex, site = (None if h else v for h, v in zip(hidden, (self.age, self.sex, self.site)))
        return Metadata(age, sex, site)

    def to_json(self) -> dict[str, Any]:
        return {"age": self.age, "sex": self.sex, "site": self.site}


def image_logit(p_mel: np.ndarray | float) -> np.ndarray:
    p = np.clip(np.asarray(p_mel, dtype=np.float64), LOGIT_CLIP, 1.0 - LOGIT_CLIP)
    return np.log(p / (1.0 - p))


def design(p_mel: np.ndarray, metadata: list[Metadata]) -> np.ndarray:
    """(N, len(FEATURES)) inputs of the regression: the image logit and the encoded fields."""
    x = np.zeros((len(metadata), len(FEATURES)))
    x[:, 0] = image_logit(p_mel)
    for i, m in enumerate(metadata):
        if m.age is None:
            x[i, 3] = 1.0
        else:
            a = (m.age - AGE_CENTRE) / AGE_SCALE
            x[i, 1], x[i, 2] = a, a * a
        if m.sex is not None:
            x[i, 4 + SEXES.index(m.sex)] = 1.0
        if m.site is not None:
            x[i, 6 + SITES.index(m.site)] = 1.0
    return x


#: Every subset of hidden fields (age, sex, site): the rows a fit sees for each validation image.
HIDDEN_SUBSETS = tuple(product((False, True), repeat=3))


def augmented(p_mel: np.ndarray, metadata: list[Metadata], y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The fitting rows: each image once per subset of hidden fields, weighted 1/8 (x, y, weights)."""
    xs = [design(p_mel, [m.hide(h) for m in metadata]) for h in HIDDEN_SUBSETS]
    n = len(HIDDEN_SUBSETS)
    return np.concatenate(xs), np.tile(np.asarray(y), n), np.full(len(metadata) * n, 1.0 / n)


@dataclass
class MetadataModel:
    """The fitted regression and its record (what it was fitted on, what was measured)."""

    coefficients: dict[str, float]
    intercept: float
    threshold: float | None = None  # on the combined P(mel): 95 % sensitivity on validation (out of fold)
    record: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def fit(cls, p_mel: np.ndarray, metadata: list[Metadata], y: np.ndarray, c: float = 1.0) -> MetadataModel:
        """L2 logistic regression (sklearn) on the augmented rows; `y` is 1 for melanoma."""
        from sklearn.linear_model import LogisticRegression

        x, yy, w = augmented(p_mel, metadata, y)
        reg = LogisticRegression(C=c, max_iter=5000).fit(x, yy, sample_weight=w)
        return cls(dict(zip(FEATURES, map(float, reg.coef_[0]))), float(reg.intercept_[0]))

    def probability(self, p_mel: np.ndarray | float, metadata: list[Metadata] | Metadata) -> np.ndarray:
        """Combined P(mel) per image (an array, shape of `p_mel`)."""
        many = isinstance(metadata, list)
        p = np.atleast_1d(np.asarray(p_mel, dtype=np.float64))
        rows = metadata if many else [metadata] * len(p)
        w = np.array([self.coefficients.get(name, 0.0) for name in FEATURES])
        z = design(p, rows) @ w + self.intercept
        return 1.0 / (1.0 + np.exp(-z))

    def to_config(self) -> dict[str, Any]:
        return {"features": list(FEATURES), "coefficients": self.coefficients, "intercept": self.intercept,
                "threshold": self.threshold, "sites": list(SITES), **self.record}

    @classmethod
    def from_config(cls, value: dict[str, Any] | None) -> MetadataModel | None:
        """The stored model, or None (no key). Unknown feature names are refused, not ignored."""
        if not value:
            return None
        unknown = set(value.get("coefficients", {})) - set(FEATURES)
        if unknown:
            raise ValueError(f"{CONFIG_KEY} has features this version does not know: {sorted(unknown)}")
        record = {k: v for k, v in value.items() if k not in ("features", "coefficients", "intercept", "threshold", "sites")}
        threshold = value.get("threshold")
        return cls(dict(value["coefficients"]), float(value["intercept"]),
                   float(threshold) if threshold is not None else None, record)


def metadata_model(config: Any) -> MetadataModel | None:
    """The `melanoma_metadata_model` of a transformers config, or None."""
    return MetadataModel.from_config(getattr(config, CONFIG_KEY, None))
