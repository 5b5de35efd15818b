"""What retrace trusts when it opens a checkpoint, and the two explicit switches that loosen it.

Verification of Hub files (``verify``, see ``retrace.checkpoints.hub``):

* ``"require"`` (the default): every fetched file is checked against the sha256 (or git blob id) the
  Hub records for the revision, online against ``HfApi.model_info``, offline (or when the Hub cannot be
  reached) against the metadata the cache holds: huggingface_hub's tree listing
  ``trees/<commit>.json``, else the content-addressed blob name. A file with no such record, or with a
  different hash, is a ``RetraceError``: retrace fails closed.
* ``"warn"``: a file that *cannot* be verified (no record anywhere) is used with a warning and the
  snapshot is marked ``verified=False``. A file whose hash *differs* from its record is still refused.
* ``"off"``: nothing is hashed (the caller vouches for the cache).

``RETRACE_ALLOW_UNVERIFIED=1`` turns the default into ``"warn"``; an explicit ``verify=`` argument wins.
``verify=True`` is ``"require"`` and ``verify=False`` is ``"off"``.

Pickles (``pytorch_model.bin``, GPT-NeoX ``*.pt``) are only read with ``torch.load(weights_only=True)``,
which is only a guarantee from torch 2.6 on: earlier versions have a code-execution bypass
(CVE-2025-32434). Under those, every pickle is refused unless ``RETRACE_ALLOW_UNSAFE_PICKLE=1``.
No torch import here: the version is passed in.
"""

from __future__ import annotations

import os
import re

from retrace.errors import RetraceError

ALLOW_UNVERIFIED_ENV = "RETRACE_ALLOW_UNVERIFIED"
ALLOW_UNSAFE_PICKLE_ENV = "RETRACE_ALLOW_UNSAFE_PICKLE"

REQUIRE, WARN, OFF = "require", "warn", "off"
VERIFY_MODES = (REQUIRE, WARN, OFF)

#: (first safe version, advisory): torch.load(weights_only=True) runs code from a crafted file before it.
PICKLE_BYPASS = ((2, 6), "CVE-2025-32434")

_VERSION_RE = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?.*", re.DOTALL)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def verify_mode(verify: str | bool | None = None) -> str:
    """The verification mode for ``verify`` (None → ``"require"``, or ``"warn"`` under
    ``RETRACE_ALLOW_UNVERIFIED=1``; True → ``"require"``; False → ``"off"``).

    Raises:
        RetraceError: ``verify`` is none of these.
    """
    if verify is None:
        return WARN if _env_flag(ALLOW_UNVERIFIED_ENV) else REQUIRE
    if verify is True:
        return REQUIRE
    if verify is False:
        return OFF
    if verify in VERIFY_MODES:
        return verify
    raise RetraceError(f"verify must be one of {', '.join(VERIFY_MODES)} (or True/False), got {verify!r}")


def torch_version_tuple(version: str) -> tuple[int, int, int] | None:
    """``"2.4.1+cu121"`` → (2, 4, 1); None when the string is no version."""
    m = _VERSION_RE.fullmatch(version.strip())
    if m is None:
        return None
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def pickle_bypass(version: str) -> str | None:
    """The advisory that makes ``weights_only=True`` unsafe under torch ``version``, or None if none is
    known. An unparsable version counts as unsafe (the guarantee cannot be shown)."""
    parsed = torch_version_tuple(version)
    safe_from, advisory = PICKLE_BYPASS
    if parsed is None or parsed[:2] < safe_from:
        return advisory
    return None


def check_pickle_allowed(path: str | os.PathLike, version: str, *, allow: bool | None = None) -> None:
    """Refuse to unpickle ``path`` under a torch ``version`` whose restricted unpickler can be bypassed.

    Args:
        path: the pickle about to be read (named in the error).
        version: ``torch.__version__``.
        allow: True reads it anyway; None (default) reads ``RETRACE_ALLOW_UNSAFE_PICKLE``.

    Raises:
        RetraceError: naming the file, the torch version, the advisory and the opt-out.
    """
    advisory = pickle_bypass(version)
    if advisory is None:
        return
    if allow is None:
        allow = _env_flag(ALLOW_UNSAFE_PICKLE_ENV)
    if allow:
        return
    first = ".".join(map(str, PICKLE_BYPASS[0]))
    raise RetraceError(
        f"{path}: refusing to unpickle under torch {version}: torch.load(weights_only=True) can run code "
        f"from a crafted file before torch {first} ({advisory}). Convert it to safetensors with torch >= "
        f"{first} (e.g. `retrace fetch-reference` in the tools environment) and open that, or set "
        f"{ALLOW_UNSAFE_PICKLE_ENV}=1 if you trust this file"
    )
