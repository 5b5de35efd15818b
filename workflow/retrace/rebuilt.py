"""A corpus rebuilt from jsonl in the workflow: the study keys ``tokenize`` and ``order_check``.

The standard Pile is published only as jsonl (reference §4), so a study that trains on its raw documents
tokenizes it first and checks the result before training on any order rebuilt over it:

``tokenize: [{output: PREFIX, input: [FILES], tokenizer: JSON, workers: N}]``
    the ``tokenize`` rule runs ``retrace tokenize`` (GPT-NeoX v1.0 preprocess_data.py --append-eod,
    ``retrace.data.tokenize``) into PREFIX.bin/.idx; every data variant whose ``path`` is PREFIX waits
    for it (its pile_data job takes them as input).
``order_check: [{raw: VARIANT, preshuffled: VARIANT, items: K, start: S}]``
    the ``order_check`` rule runs ``retrace order-check``: the seed-``order_seed`` index maps over the raw
    variant (read from the maps ``order_maps`` built) must give the preshuffled variant's items
    [S, S + K) item for item. It writes ``resources/order_check/<raw>.json`` only on a match, and every
    cell training on a raw variant over the same copy (same ``path``: one tokenization, any order seed)
    takes that record as input: a rebuilt corpus that does not reproduce the published stream stops the
    study before any GPU time is spent. The preshuffled variant need not be on an axis; only the shards
    covering [S, S + K) are fetched for it.

Torch-free: the workflow imports it while building the DAG.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from retrace.errors import RetraceError

if TYPE_CHECKING:
    from retrace.grid import DataVariant, Study

ORDER_CHECK_DIR = "resources/order_check"
#: A wildcard constraint that matches nothing (a study without ``tokenize``).
NOTHING = r"(?!x)x"


def tokenize_entries(study: Study) -> list[dict[str, Any]]:
    return [dict(e) for e in study.config.get("tokenize") or []]


def tokenize_entry(study: Study, prefix: str) -> dict[str, Any]:
    for e in tokenize_entries(study):
        if e["output"] == prefix:
            return e
    raise RetraceError(f"tokenize: no entry writes {prefix!r}")


def tokenize_prefix_pattern(study: Study) -> str:
    """The ``{prefix}`` wildcard constraint of the tokenize rule: exactly the study's outputs."""
    outs = [re.escape(e["output"]) for e in tokenize_entries(study)]
    return "|".join(outs) if outs else NOTHING


def tokenized_inputs(study: Study, variant: DataVariant) -> list[str]:
    """PREFIX.bin/.idx when a ``tokenize`` entry writes the variant's ``path`` (pile_data waits), else []."""
    if variant.path is None or not any(e["output"] == variant.path for e in tokenize_entries(study)):
        return []
    return [f"{variant.path}.bin", f"{variant.path}.idx"]


def order_check_entries(study: Study) -> list[dict[str, Any]]:
    """The ``order_check`` entries, checked against the study's data and defaults filled in."""
    out = []
    for i, e in enumerate(study.config.get("order_check") or []):
        raw, pre = study.data.get(e["raw"]), study.data.get(e["preshuffled"])
        where = f"config key order_check[{i}]"
        if raw is None or raw.format != "raw" or raw.source != "pile":
            raise RetraceError(f"{where}.raw: {e['raw']!r} is not a raw Pile data variant")
        if pre is None or pre.format != "preshuffled" or pre.shuffle_samples or pre.source != "pile":
            raise RetraceError(f"{where}.preshuffled: {e['preshuffled']!r} is not a published preshuffled Pile stream")
        if raw.corpus != pre.corpus:
            raise RetraceError(f"{where}: {raw.name} is the {raw.corpus} Pile, {pre.name} the {pre.corpus} one")
        out.append({"raw": raw.name, "preshuffled": pre.name, "items": int(e.get("items", 10240)),
                    "start": int(e.get("start", 0)), "seed": raw.order_seed})
    return out


def order_check_record(raw_name: str) -> str:
    return f"{ORDER_CHECK_DIR}/{raw_name}.json"


def order_check_entry(study: Study, raw_name: str) -> dict[str, Any]:
    for e in order_check_entries(study):
        if e["raw"] == raw_name:
            return e
    raise RetraceError(f"order_check: no entry checks {raw_name!r}")


def gate_for(study: Study, variant: DataVariant) -> list[str]:
    """The order-check records a cell on ``variant`` waits for: those of raw variants over the same copy."""
    if variant.format != "raw" or variant.path is None:
        return []
    return [order_check_record(e["raw"]) for e in order_check_entries(study)
            if study.data[e["raw"]].path == variant.path]


def preshuffled_items_needed(study: Study, variant_name: str) -> int | None:
    """Items [0, N) of a preshuffled variant the order checks read (None: no check reads it)."""
    ends = [e["start"] + e["items"] for e in order_check_entries(study) if e["preshuffled"] == variant_name]
    return max(ends) if ends else None
