"""How names given by users are recognised, in one place: Hub repository ids and model sizes (``7B``).

Used by the recommender (``--model``), the dataset loader (``data.path``) and the app's workspace (which keeps
names that are not paths from being read as files).
"""

from __future__ import annotations

import re

#: a Hub repository id as huggingface_hub validates it: ``owner/name`` of letters, digits and ``-_.``, starting with
#: a letter or digit (``huggingface_hub.utils.validate_repo_id``); ``..`` is refused separately
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+")
#: a canonical dataset on the Hub has no owner (``squad``, ``gsm8k``)
_CANONICAL = re.compile(r"[A-Za-z0-9][\w.\-]*")
#: a model size as ``resolve_model`` reads it: ``7B``, ``0.5B``, ``500M``
MODEL_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([bBmM])\s*")


def is_hub_id(text: str, *, owner_optional: bool = False) -> bool:
    """``owner/name`` (or, with ``owner_optional``, also a canonical dataset name without an owner)."""
    if ".." in text:
        return False
    return bool(_REPO_ID.fullmatch(text) or (owner_optional and _CANONICAL.fullmatch(text)))


def model_size(text: str) -> float | None:
    """Parameters named by a size such as ``7B`` or ``500M``, or None when ``text`` is not one."""
    m = MODEL_SIZE.fullmatch(text)
    return float(m.group(1)) * (10**9 if m.group(2).lower() == "b" else 10**6) if m else None
