"""The study's `forensics` target, run for real by Snakemake on a local hub cache: an identical step 0,
another seed's (same scheme, other RNG), and a repo that is not there (recorded, not guessed)."""

from __future__ import annotations

import json

import pytest
import yaml

from snakemake_runner import snakemake
from test_train_helpers import make_reference

pytestmark = pytest.mark.slow  # three `retrace compare` subprocesses


def test_forensics_target_reads_each_pair(tmp_path):
    from retrace.checkpoints.hubcache import publish_to_hub_cache

    cache = tmp_path / "hub"
    for repo, seed in (("fix/tiny", 0), ("fix/copy", 0), ("fix/other", 1)):
        ref = make_reference(tmp_path / repo.replace("/", "_"), seed=seed)
        files = {"config.json": ref / "config.json", "model.safetensors": ref / "model.safetensors"}
        for rev in ("step0", "step1", "step2"):
            publish_to_hub_cache(cache, repo, rev, files)
    local = {"hub_cache": str(cache), "recipe": "70m", "global_batch": 4}
    study = {
        "study": "tiny-forensics",
        "models": {"tiny": {"reference": "fix/tiny", **local}, "copy": {"reference": "fix/copy", **local},
                   "other": {"reference": "fix/other", **local}},
        "data": {"deduped-raw": {"source": "synthetic", "corpus": "deduped", "format": "raw"}},
        "axes": {"model": ["tiny"], "data": ["deduped-raw"], "parallel": [{"gpus": 1, "pdbs": 4, "gas": 1}],
                 "steps": [2]},
        "forensics": [{"model": "fix/tiny", "against": ["fix/copy", "fix/other", "fix/absent"]}],
    }
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(study))
    wd = tmp_path / "wd"
    out = snakemake("forensics", "--cores", "1", "--configfile", str(path), workdir=wd)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    pairs = {p["other"]: p for p in json.loads((wd / "results" / "forensics" / "forensics.json").read_text())["pairs"]}
    assert pairs["fix/copy"]["reading"] == "identical" and pairs["fix/copy"]["l2"] == 0
    assert pairs["fix/other"]["reading"] == "same init scheme, different RNG"
    assert pairs["fix/absent"]["status"].startswith("not compared:")
    text = (wd / "results" / "forensics" / "forensics.txt").read_text()
    assert "fix/tiny@step0 vs fix/other@step0: same init scheme, different RNG" in text
