"""What a study's audit target reads: which repos, and from where (the Hub, or one local hub cache).

The `audit` rule renders ``retrace audit REPO… OPTIONS`` from ``audit_repos`` and ``audit_options``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from retrace.errors import RetraceError

if TYPE_CHECKING:
    from retrace.grid import Study


def audit_repos(study: Study) -> list[str]:
    """The references the cells train and compare against, then ``audit.repos``, each once."""
    return list(dict.fromkeys([m.reference for m in study.used_models()] + list(study.audit["repos"])))


def audit_cache(study: Study) -> str | None:
    """The hub cache an all-local study is audited from (offline), or None when every reference is on the Hub.

    Raises:
        RetraceError: the study mixes Hub and local references, or several local caches
            (``retrace audit`` reads one source).
    """
    used = study.used_models()
    local = sorted({m.hub_cache for m in used if m.is_local})
    remote = [m.name for m in used if not m.is_local]
    if not local:
        return None
    if remote or len(local) > 1:
        raise RetraceError(
            f"audit: study {study.name} mixes references from the Hub ({', '.join(remote) or 'none'}) and "
            f"local hub caches ({', '.join(local)}); `retrace audit` reads one source, so audit them "
            "separately (retrace audit REPO… [--offline --cache-dir DIR])"
        )
    return local[0]


def audit_options(study: Study) -> list[str]:
    """--offline --cache-dir and the last published step for local references; --weights if asked."""
    from retrace.grid import local_reference_steps

    flags = []
    cache = audit_cache(study)
    if cache is not None:
        last = 0
        for m in study.used_models():
            steps = m.build.saved_steps() if m.build is not None else local_reference_steps(m.hub_cache, m.reference)
            last = max([last, *steps])
        flags += ["--offline", "--cache-dir", cache, "--max-step", str(last)]
    if study.audit["weights"]:
        flags.append("--weights")
    return flags
