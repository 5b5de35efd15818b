"""Checkpoint audit of published repos: clones, missing revisions, format changes, weights that do not move.

    audit(repos, source=None, ...)   → AuditReport (.incidents, .frame(), .render(), .to_dict())
    HubMetadata / CacheMetadata      where per-revision file lists (with LFS sha256) come from
    pythia_steps(), PYTHIA_STEPS     the 154-branch Pythia schedule

See ``retrace.audit.core`` for the incident kinds and ``retrace.audit.metadata`` for the sources.
"""

from retrace.audit.core import INCIDENT_KINDS, ROW_COLUMNS, AuditReport, Incident, audit, make_source
from retrace.audit.metadata import (
    CacheMetadata,
    FileMeta,
    HubMetadata,
    MetadataSource,
    RevisionMeta,
    branches_from_refs,
    files_from_model_info,
    weight_kind,
)
from retrace.pythia.schedule import (
    FINAL_STEP,
    PYTHIA_STEPS,
    format_revisions,
    parse_steps,
    pythia_steps,
    step_of,
)

__all__ = [
    "FINAL_STEP",
    "INCIDENT_KINDS",
    "PYTHIA_STEPS",
    "ROW_COLUMNS",
    "AuditReport",
    "CacheMetadata",
    "FileMeta",
    "HubMetadata",
    "Incident",
    "MetadataSource",
    "RevisionMeta",
    "audit",
    "branches_from_refs",
    "files_from_model_info",
    "format_revisions",
    "make_source",
    "parse_steps",
    "pythia_steps",
    "step_of",
    "weight_kind",
]
