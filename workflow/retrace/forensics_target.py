"""The optional ``forensics`` target of a study: step-0 forensics of published repos against others.

``forensics: [{model: org/a, against: [org/b, org/c], step: 0}]`` runs ``retrace compare
org/a@step0 org/b@step0 --forensics --json`` (``retrace.forensics``: identical, partially identical,
different scheme, related, or the same init scheme with another RNG) for every pair, where Snakemake
runs (it reads the Hub, or the hub cache of local references, like the audit), and writes

    results/forensics/forensics.json   one object per pair: model, other, step, reading, headline,
                                       findings, θ Cos, L2 (or ``status: "missing: …"`` when a repo
                                       or step cannot be opened, recorded instead of failing)
    results/forensics/forensics.txt    the same, rendered for people

The question it answers for EleutherAI/neox-ckpt-pythia-14m-seed0 (studies/pythia-14m-seed0.yaml):
does its step 0 equal, or share an RNG stream with, any published run's?

Torch-free: the workflow imports it while building the DAG (each pair runs in a subprocess).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import TYPE_CHECKING, Any

from retrace.errors import RetraceError
from retrace.io import atomic_open, write_json

if TYPE_CHECKING:
    from retrace.grid import Study

FORENSICS_JSON = "results/forensics/forensics.json"
FORENSICS_TEXT = "results/forensics/forensics.txt"


def forensics_entries(study: Study) -> list[dict[str, Any]]:
    """The ``forensics`` entries, step filled in (default 0)."""
    return [{"model": e["model"], "against": list(e["against"]), "step": int(e.get("step", 0))}
            for e in study.config.get("forensics") or []]


def forensics_targets(study: Study) -> list[str]:
    return [FORENSICS_JSON, FORENSICS_TEXT] if forensics_entries(study) else []


def _hub_env(study: Study, repos: set[str]) -> dict[str, str]:
    from retrace.jobs import PACKAGE_DIR

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PACKAGE_DIR), os.environ.get("PYTHONPATH", "")])}
    caches = sorted({m.hub_cache for m in study.models.values() if m.reference in repos and m.is_local})
    if len(caches) > 1:
        raise RetraceError(f"forensics: repos {sorted(repos)} are in several local hub caches ({', '.join(caches)})")
    if caches:
        env.update(HF_HUB_CACHE=caches[0], HF_HUB_OFFLINE="1")
    return env


def write_forensics(study: Study, json_path: str, text_path: str, log_path: str) -> None:
    """Every pair of every entry (see the module doc); both outputs atomically, JSON first."""
    rows: list[dict[str, Any]] = []
    texts: list[str] = []
    with open(log_path, "w", encoding="utf-8") as log:
        for entry in forensics_entries(study):
            a = f"{entry['model']}@step{entry['step']}"
            for other in entry["against"]:
                b = f"{other}@step{entry['step']}"
                argv = [sys.executable, "-m", "retrace", "compare", a, b, "--forensics", "--json"]
                print("$ " + " ".join(argv), file=log, flush=True)
                done = subprocess.run(argv, env=_hub_env(study, {entry["model"], other}), capture_output=True,
                                      text=True, check=False)
                log.write(done.stderr)
                row: dict[str, Any] = {"model": entry["model"], "other": other, "step": entry["step"]}
                if done.returncode != 0:
                    why = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
                    row["status"] = f"not compared: {why}"
                    texts.append(f"{a} vs {b}: not compared ({why})")
                else:
                    f = json.loads(done.stdout)["forensics"]
                    row.update(status="ok", reading=f["reading"], headline=f["headline"], findings=f["findings"],
                               cos=f["similarity"].get("cos"), l2=f["similarity"].get("l2"))
                    texts.append(f"{a} vs {b}: {f['reading']}\n  {f['headline']}"
                                 + "".join(f"\n  - {x}" for x in f["findings"]))
                rows.append(row)
    write_json(json_path, {"pairs": rows})
    with atomic_open(text_path, "w", encoding="utf-8") as fh:
        fh.write("Step-0 forensics (retrace compare --forensics)\n\n" + "\n\n".join(texts) + "\n")
