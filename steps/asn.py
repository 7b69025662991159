"""jwst association files: read one (one product, its members) and write one from a list of files.

The JSON layout is jwst's (``jwst.associations``; schema ``asn_schema_jw_level3.json``)::

    {"asn_type": "image3", "asn_rule": "DMS_Level3_Base", "version_id": null,
     "code_version": "...", "degraded_status": "...", "program": "noprogram",
     "constraints": "No constraints", "asn_id": "a3001", "target": "none", "asn_pool": "none",
     "products": [{"name": "mosaic", "members": [{"expname": "a_cal.fits", "exptype": "science"}]}]}

Member ``expname`` values are resolved relative to the folder of the association file (as jwst's
``ModelLibrary`` does); absolute names stay as they are.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from .errors import InputError
from .fitsio import atomic_output
from .products import software_version

DEFAULT_ASN_ID = "a3001"  # what jwst's DMS_Level3_Base writes when no candidate id is known


@dataclass(frozen=True)
class Member:
    """One input of an association product: a file name and its role ("science", "background", ...)."""

    expname: str
    exptype: str


@dataclass(frozen=True)
class Association:
    """A single-product association as loaded from a jwst ``*_asn.json``."""

    asn_id: str
    asn_type: str
    asn_rule: str
    product_name: str
    members: tuple[Member, ...]
    path: Path | None = None
    program: str | None = None

    def member_paths(self) -> list[Path]:
        """Every member's file, relative names resolved against the association file's folder."""
        base = self.path.parent if self.path is not None else Path(".")
        return [base / m.expname for m in self.members]

    def science(self) -> tuple[Member, ...]:
        """The members whose exptype is "science" (case-insensitive)."""
        return tuple(m for m in self.members if m.exptype.lower() == "science")


def load_association(path: str | Path) -> Association:
    """Read a jwst association JSON file; InputError naming the file for anything malformed."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError as exc:
        raise InputError(path, "association file does not exist") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read the association file ({exc})") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(path, f"not valid JSON ({exc})") from exc
    return association_from_dict(data, path)


def association_from_dict(data: Any, path: str | Path | None = None) -> Association:
    """Validate the parsed JSON of an association (``path`` only names it in errors)."""
    if not isinstance(data, Mapping):
        raise InputError(path, "an association must be a JSON object")
    products = data.get("products")
    if products is None:
        raise InputError(path, "association has no 'products' key")
    if not isinstance(products, list) or not products:
        raise InputError(path, "association 'products' must be a non-empty list")
    if len(products) > 1:
        raise InputError(path, f"association has {len(products)} products; only one product is supported")
    product = products[0]
    if not isinstance(product, Mapping):
        raise InputError(path, "association product must be a JSON object")
    name = product.get("name")
    if not isinstance(name, str) or not name.strip():
        raise InputError(path, "association product has no 'name' (the output product name)")
    asn_id = _optional_str(data, "asn_id", path)
    for key, value in (("products[0].name", name), ("asn_id", asn_id)):
        if _unsafe_name(value):
            raise InputError(path, f"association {key} {value!r} is not a plain file name (no folders, '..' or NUL)")
    members = tuple(_member(m, i, path) for i, m in enumerate(_members_list(product, path)))
    program = data.get("program")
    return Association(asn_id=asn_id, asn_type=_optional_str(data, "asn_type", path),
                       asn_rule=_optional_str(data, "asn_rule", path), product_name=name, members=members,
                       path=Path(path) if path is not None else None,
                       program=None if program is None else str(program))


def _unsafe_name(value: str) -> bool:
    """True when ``value`` would leave the folder it names a file in."""
    return "/" in value or "\\" in value or "\x00" in value or value.strip() in (".", "..")


def asn_from_list(files: Iterable[str | Path], product_name: str, *, asn_type: str = "image3",
                  asn_rule: str = "DMS_Level3_Base", asn_id: str | None = None) -> dict:
    """An association dict with every file a science member, laid out as jwst's asn_from_list writes.

    File names are stored as given (as jwst does): relative names are later resolved against the
    association file's folder.
    """
    if not product_name or not str(product_name).strip():
        raise ValueError("product_name must be a non-empty string")
    expnames = [os.fspath(f) for f in files]
    if not expnames:
        raise ValueError("an association needs at least one member file")
    return {
        "asn_type": asn_type,
        "asn_rule": asn_rule,
        "version_id": None,
        "code_version": software_version(),
        "degraded_status": "No known degraded exposures in association.",
        "program": "noprogram",
        "constraints": "No constraints",
        "asn_id": asn_id or DEFAULT_ASN_ID,
        "target": "none",
        "asn_pool": "none",
        "products": [{"name": str(product_name),
                      "members": [{"expname": e, "exptype": "science"} for e in expnames]}],
    }


def write_association(asn: Mapping[str, Any], path: str | Path) -> Path:
    """Write an association dict as indented JSON through a temporary name and a rename."""
    path = Path(path)
    association_from_dict(asn, path)  # never write something load_association would refuse
    with atomic_output(path) as tmp, open(tmp, "w") as stream:
        json.dump(asn, stream, indent=4)
        stream.write("\n")
    return path


def _members_list(product: Mapping[str, Any], path: str | Path | None) -> list:
    members = product.get("members")
    if members is None:
        raise InputError(path, "association product has no 'members' key")
    if not isinstance(members, list) or not members:
        raise InputError(path, "association product has no members")
    return members


def _member(entry: Any, index: int, path: str | Path | None) -> Member:
    if not isinstance(entry, Mapping):
        raise InputError(path, f"association member {index} must be a JSON object")
    for key in ("expname", "exptype"):
        value = entry.get(key)
        if not isinstance(value, str) or not value.strip():
            raise InputError(path, f"association member {index} has no '{key}' string")
    return Member(expname=entry["expname"], exptype=entry["exptype"])


def _optional_str(data: Mapping[str, Any], key: str, path: str | Path | None) -> str:
    value = data.get(key, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InputError(path, f"association '{key}' must be a string, not {type(value).__name__}")
    return value
