"""The tests' study configs: one factory, so a change of the study format is made in one place."""

from __future__ import annotations

from typing import Any

#: Two synthetic raw variants: nothing to download, and a dry run fetches nothing.
SYNTHETIC_DATA = {
    "deduped-raw": {"source": "synthetic", "corpus": "deduped", "format": "raw"},
    "standard-raw": {"source": "synthetic", "corpus": "standard", "format": "raw"},
}


def synthetic_study(name: str = "unit", *, models: dict[str, Any] | None = None, **axes: Any) -> dict[str, Any]:
    """A study of published Hub repos (pythia-70m-deduped by default) on both synthetic raw variants, one
    layout of the Pythia-70m batch and 4 steps; ``axes`` replace axis values."""
    models = models or {"pythia-70m-deduped": {"reference": "EleutherAI/pythia-70m-deduped",
                                               "documented": "deduped-raw"}}
    return {
        "study": name,
        "models": models,
        "data": {k: dict(v) for k, v in SYNTHETIC_DATA.items()},
        "axes": {"model": [next(iter(models))], "data": list(SYNTHETIC_DATA),
                 "parallel": [{"gpus": 32, "pdbs": 32, "gas": 1}], "steps": [4], **axes},
    }
