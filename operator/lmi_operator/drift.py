"""Does a live object still hold what the operator applies? Decides whether an apply is needed,
so that an unchanged spec costs no request and a hand-edited field is put back."""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

_QUANTITY = re.compile(r"^([+-]?[0-9.]+)([a-zA-Z]*)$")
_SUFFIX: dict[str, Decimal | int] = {
    "": 1,
    "m": Decimal("0.001"),
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}


def _quantity(value: str) -> Decimal | None:
    match = _QUANTITY.match(value)
    if not match or match.group(2) not in _SUFFIX:
        return None
    try:
        return Decimal(match.group(1)) * _SUFFIX[match.group(2)]
    except ArithmeticError:
        return None


def _scalar_equal(want: Any, have: Any) -> bool:
    if want == have and type(want) is type(have):
        return True
    # The API server writes resource quantities in canonical form ("1024Mi" comes back as "1Gi").
    if isinstance(want, str) and isinstance(have, str):
        a, b = _quantity(want), _quantity(have)
        return a is not None and a == b
    return False


def _key(item: Any) -> Any:
    if isinstance(item, Mapping):
        for field in ("mountPath", "name", "containerPort", "port", "key", "type"):
            if field in item:
                return (field, item[field])
    return None


def contains(live: Any, desired: Any) -> bool:
    """True when every field of `desired` is in `live` with the same value. Lists of named items
    are matched by name (others' extra items are theirs); other lists must match in order."""
    if isinstance(desired, Mapping):
        return isinstance(live, Mapping) and all(
            k in live and contains(live[k], v) for k, v in desired.items()
        )
    if isinstance(desired, list):
        if not isinstance(live, list):
            return False
        keys = [_key(d) for d in desired]
        # Keys must tell the items apart: two HPA metrics of one `type` are compared in order.
        if all(k is not None for k in keys) and len(set(keys)) == len(keys):
            by_key = {_key(item): item for item in live}
            return all(k in by_key and contains(by_key[k], d) for k, d in zip(keys, desired, strict=True))
        return len(live) == len(desired) and all(contains(a, b) for a, b in zip(live, desired, strict=True))
    return _scalar_equal(desired, live)
