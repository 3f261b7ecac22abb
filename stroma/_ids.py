"""The rules for the ids Stroma is given: run ids and the step-id prefix Stroma keeps for itself.

One rule each, applied everywhere an id arrives (``RunConfig.run_id``, ``run(run_id=...)``, a
fleet lease, every checkpoint store), so an id one part accepts is never refused by another.
"""

from __future__ import annotations

import re
from typing import Final

MAX_RUN_ID_CHARS: Final = 256
"""The longest run id, in characters."""

RESERVED_PREFIX: Final = "\x00stroma:"
"""Step ids starting with this are Stroma's own records (a run's manifest); user steps may not use it."""


_CONTROL_CHAR: Final = re.compile("[\x00-\x1f\x7f]")
"""A control character (U+0000-U+001F, U+007F): one C-level scan instead of a loop per character."""


def run_id_problem(value: object) -> str | None:
    """What is wrong with *value* as a run id (a phrase such as ``"must be a string"``), or ``None``.

    A run id is a ``str`` of 1-256 characters without control characters (U+0000-U+001F and
    U+007F). Anything else is allowed (``:``, ``/``, spaces, any script): checkpoint stores
    never build keys by joining ids.
    """
    if not isinstance(value, str):
        return "must be a string"
    if not value:
        return "must not be empty"
    if len(value) > MAX_RUN_ID_CHARS:
        return f"must be at most {MAX_RUN_ID_CHARS} characters (has {len(value)})"
    if _CONTROL_CHAR.search(value) is not None:
        return "must not contain control characters"
    return None
