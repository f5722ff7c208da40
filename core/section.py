"""The base of every params.yaml section: validated, frozen, hashed into its stage's cache key.

A stage declares its own section class beside its code (tasks/stages/); the sections no single stage owns
(storage, execution, body_model, models) are in core/params.py. Numbers that differ per model profile are tables
keyed by profile, so one params.yaml serves every machine.
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import BaseModel, ConfigDict

from core.hashing import hash_obj

PROFILES = ("tiny", "cpu", "sd15")


class Section(BaseModel):
    # strict: YAML already gives native types, so `true` for a number or "5" for an int is a mistake to report
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    def digest(self) -> str:
        return hash_obj(self.model_dump(mode="json"))


def check_profiles(name: str, table: dict[str, float], ok: Callable[[float], bool], rule: str) -> None:
    """A table keyed by profile: one value for each, every value passing `ok` (`rule` says what it asks)."""
    missing = [p for p in PROFILES if p not in table]
    unknown = [p for p in table if p not in PROFILES]
    if missing or unknown:
        raise ValueError(f"{name} needs one value per profile ({', '.join(PROFILES)}); "
                         f"missing {missing}, unknown {unknown}")
    if not all(ok(v) for v in table.values()):
        raise ValueError(f"{name}: {rule}, got {table}")
