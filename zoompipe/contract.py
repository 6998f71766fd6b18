"""The pipeline contract: everything that decides which patches exist and how they are embedded.

``preprocess`` writes one into every feature file, ``train`` copies the one its files agree on
into the run's ``config.json``, and ``predict`` and ``heatmap`` rebuild the very same patches
from it. It is one validated, versioned object: a file written by another schema version is
refused with a one-line error naming both versions, never read with silent defaults.

Some fields belong to one slide (its resolution and where that came from, the digest of the
mask drawn for it); :meth:`PipelineContract.for_run` drops them, and two contracts *agree*
when they are equal once those and the encoder's precision are left out. Precision is chosen
by the hardware at run time: it is recorded, never imposed.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ContractError
from .grid import magnification_ratios
from .tissue import TissueParams

SCHEMA_VERSION = 1

# What differs from slide to slide, or machine to machine, without changing the patches.
_NOT_AGREED = {"slide": True, "tissue": {"user_masks": {"file", "sha256"}}, "encoder": {"precision"}}


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


V = TypeVar("V", bound="Versioned")


class Versioned(_Frozen):
    """A record read back from disk: refused unless written with this schema version."""

    #: What the record is called in messages, and how to get one of this version.
    what: ClassVar[str] = "record"
    redo: ClassVar[str] = "write it again with this zoompipe"
    schema_version: Literal[SCHEMA_VERSION] = SCHEMA_VERSION

    @classmethod
    def from_data(cls: type[V], data: Any, source: str | Path) -> V:
        """Validate a decoded record; ``source`` names its file in error messages.

        Raises
        ------
        ContractError
            Another schema version (both versions named), or an invalid record.
        """
        found = data.get("schema_version") if isinstance(data, dict) else None
        if found != SCHEMA_VERSION:
            raise ContractError(f"{source}: {cls.what} schema version {'missing' if found is None else found}, "
                                f"this zoompipe reads version {SCHEMA_VERSION}; {cls.redo}")
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise ContractError(f"{source}: invalid {cls.what} ({where}: {first['msg']})") from None

    @classmethod
    def from_json(cls: type[V], text: str, source: str | Path) -> V:
        """Parse a record written by :meth:`to_json`."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ContractError(f"{source}: {cls.what} is not JSON ({err.msg}, line {err.lineno})") from None
        return cls.from_data(data, source)

    def to_json(self, indent: int | None = None) -> str:
        return self.model_dump_json(indent=indent)


class SlideSettings(_Frozen):
    """How one slide's resolution was known."""

    mpp: float = Field(gt=0, description="level-0 microns per pixel used")
    mpp_source: str = Field(description="metadata field it came from, or 'override' (--mpp, --mpp-csv)")


class UserMasks(_Frozen):
    """Tissue masks drawn by people, ``<slide_id>.geojson`` or ``<slide_id>.png`` in ``dir``."""

    dir: str
    file: str | None = Field(None, description="this slide's mask file; None where it was segmented")
    sha256: str | None = None


ChildrenPolicy = Literal["all", "tissue"]


class TissueSettings(_Frozen):
    """Segmentation parameters, and the user masks that replace segmentation where they exist."""

    segmentation: TissueParams = Field(default_factory=TissueParams)
    user_masks: UserMasks | None = None


class GridSettings(_Frozen):
    """The cascade of patch grids."""

    magnifications: tuple[float, ...] = Field(min_length=1, description="base first, integer ratios")
    patch_size: int = Field(ge=1, description="patch side in pixels at every magnification")
    min_tissue: float = Field(ge=0, le=1, description="tissue fraction a base patch needs")
    children: ChildrenPolicy = Field(
        "all", description="'all': every descendant of a base tissue patch; 'tissue': at the last "
                           "magnification only those with min_tissue, as a single-magnification pipeline tiles")

    @field_validator("magnifications")
    @classmethod
    def _nested(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        magnification_ratios(value)
        return value


class EncoderSettings(_Frozen):
    """The patch encoder and the identity of its weights."""

    name: str
    feature_dim: int = Field(ge=1)
    weights: str = Field(description="'sha256:<hex>' of a weights file, or where default weights come from")
    precision: str = Field(description="precision the features were computed in (recorded, not imposed)")


class PipelineContract(Versioned):
    """What a feature file's patches and features depend on; see the module docstring."""

    what: ClassVar[str] = "pipeline contract"
    redo: ClassVar[str] = "run zoompipe preprocess again (and train on its features)"
    grid: GridSettings
    tissue: TissueSettings = Field(default_factory=TissueSettings)
    encoder: EncoderSettings
    slide: SlideSettings | None = Field(None, description="None in a run's contract")

    def for_run(self) -> PipelineContract:
        """The contract without what belongs to one slide."""
        masks = self.tissue.user_masks
        tissue = self.tissue.model_copy(update={"user_masks": masks and UserMasks(dir=masks.dir)})
        return self.model_copy(update={"slide": None, "tissue": tissue})

    def agreement_key(self) -> dict[str, Any]:
        """The fields that every feature file of one training set must share."""
        return self.model_dump(mode="json", exclude=_NOT_AGREED)


def first_disagreement(a: PipelineContract, b: PipelineContract) -> str | None:
    """``"encoder.name: 'x' vs 'y'"`` for the first field where two contracts do not agree, else None."""
    def flat(value: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(value, dict):
            return {k: v for key, item in value.items() for k, v in flat(item, f"{prefix}{key}.").items()}
        return {prefix[:-1]: value}

    left, right = flat(a.agreement_key()), flat(b.agreement_key())
    for key in sorted(left.keys() | right.keys()):
        if left.get(key) != right.get(key):
            return f"{key}: {left.get(key)!r} vs {right.get(key)!r}"
    return None


def contract_difference(a: PipelineContract | None, b: PipelineContract | None) -> str | None:
    """Why two recorded contracts, either of which may be missing, do not agree; None when they do.

    Two missing contracts agree (features from elsewhere on both sides); one missing does not.
    """
    if (a is None) != (b is None):
        return "one of them records no pipeline contract"
    return None if a is None else first_disagreement(a, b)


def file_sha256(path: str | Path) -> str:
    """``sha256:<hex>`` of a file's bytes: the identity of a weights or mask file.

    A file of the Hugging Face cache links to a blob named by its SHA-256 (large, LFS-stored
    files), which is taken as it is instead of reading gigabytes again.
    """
    target = Path(path).resolve()
    if Path(path).is_symlink() and target.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", target.name):
        return f"sha256:{target.name}"
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"
