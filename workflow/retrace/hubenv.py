"""How this process reaches the Hugging Face Hub: offline or not, and which cache, read at call time.

huggingface_hub reads ``HF_HUB_OFFLINE`` and ``HF_HUB_CACHE`` once, at import; retrace reads them on
every call, so a test or a rule that sets them after import is obeyed. No torch, no huggingface_hub.
"""

from __future__ import annotations

import os
from pathlib import Path


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as the environment says now."""
    if "HF_HUB_OFFLINE" in os.environ:
        return _truthy(os.environ["HF_HUB_OFFLINE"])
    return _truthy(os.environ.get("TRANSFORMERS_OFFLINE"))


def hub_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$HF_HUB_CACHE`` (or ``$HUGGINGFACE_HUB_CACHE``), else ``$HF_HOME/hub``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expandvars(os.environ[var])).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface"
    )
    return Path(os.path.expandvars(home)).expanduser() / "hub"
