"""The reference hygiene gate (retrace.audit.gate) on the audit's fixture repos (a real hub cache).

The pythia-2.8b shape (early branches serving the final weights) must be refused with one message
naming repo, branch, finding and the key that overrides it; the healthy control must pass, its
expected step1 = step0 flagging nothing; a #83-shaped repo (step0 = step2) flags both steps.
"""

from __future__ import annotations

import pytest

from retrace import jobs
from retrace.audit import CacheMetadata
from retrace.audit.gate import check_start, findings_for, flagged_steps, read_findings, write_findings
from retrace.errors import RetraceError
from retrace.grid import load_study
from study_factory import synthetic_study
from test_audit import Files, publish, theta
from test_audit import cache as _cache_fixture

cache = _cache_fixture


def findings(cache, repo):
    return findings_for(repo, CacheMetadata(cache), max_step=8)


def test_like_pythia_2_8b_start_is_refused(cache):
    found = findings(cache, "fix/like-2.8b")
    assert set(flagged_steps(found)) == {0, 1, 2}
    with pytest.raises(RetraceError) as exc:
        check_start(found, 0, override="models.m28.accept")
    msg = str(exc.value)
    assert msg.startswith("refusing to start from fix/like-2.8b@step0: the audit flags it: clone-of-final (")
    assert "models.m28.accept: [step0]" in msg
    check_start(found, 0, accept=["step0"])  # accepted: passes
    check_start(found, 4)  # an unflagged later step passes


def test_healthy_control_passes_and_step1_alias_is_not_an_incident(cache):
    found = findings(cache, "fix/healthy")
    assert found["flagged"] == {}
    assert {n["kind"] for n in found["notes"]} == {"step1-alias", "main-alias"}
    for step in (0, 1, 2, 4, 8):
        check_start(found, step)


def test_step0_equal_to_step2_flags_both(cache, tmp_path):
    f = Files(tmp_path / "files")
    s = {t: f.bin(theta(t, seed=83)) for t in (0, 4, 8)}
    publish(cache, "fix/like-83", {"step0": s[0], "step1": s[0], "step2": s[0], "step4": s[4],
                                   "step8": s[8], "main": s[8]})  # fmt: skip
    found = findings(cache, "fix/like-83")
    assert set(flagged_steps(found)) == {0, 1, 2}
    assert {f["kind"] for f in found["flagged"]["step0"]} == {"identical"}


def test_findings_file_round_trip(cache, tmp_path):
    path = tmp_path / "findings.json"
    write_findings(path, findings(cache, "fix/like-12b"))
    assert set(flagged_steps(read_findings(path))) == {4}  # the shard of the final model's


def test_workflow_gate_for_a_study(cache, tmp_path):
    """The jobs the rules run: findings once per repo, then the gate per model, failing with the key."""
    models = {
        "m28": {"reference": "fix/like-2.8b", "hub_cache": str(cache), "global_batch": 8, "recipe": "70m"},
        "ok": {"reference": "fix/healthy", "hub_cache": str(cache), "global_batch": 8, "recipe": "70m"},
    }
    cfg = synthetic_study(models=models, parallel=[{"gpus": 1, "pdbs": 8, "gas": 1}])
    cfg["axes"]["model"] = ["m28", "ok"]
    study = load_study(cfg, root=".")
    for name, repo in (("m28", "fix/like-2.8b"), ("ok", "fix/healthy")):
        jobs.write_reference_findings(study, repo, str(tmp_path / f"{name}.json"), str(tmp_path / "log"))
    jobs.check_start_gate(study, "ok", str(tmp_path / "ok.json"), str(tmp_path / "ok-gate.json"),
                          str(tmp_path / "ok.log"))
    with pytest.raises(RetraceError, match=r"fix/like-2.8b@step0.*clone-of-final.*models\.m28\.accept"):
        jobs.check_start_gate(study, "m28", str(tmp_path / "m28.json"), str(tmp_path / "m28-gate.json"),
                              str(tmp_path / "m28.log"))
    assert not (tmp_path / "m28-gate.json").exists()
    assert "refusing to start from fix/like-2.8b@step0" in (tmp_path / "m28.log").read_text()
    cfg["models"]["m28"]["accept"] = ["step0"]
    study = load_study(cfg, root=".")
    jobs.check_start_gate(study, "m28", str(tmp_path / "m28.json"), str(tmp_path / "m28-gate.json"),
                          str(tmp_path / "m28.log"))


def test_flagged_steps_table_for_the_report(cache, tmp_path):
    """The report's list of flagged published steps, from the findings files where the workflow writes them."""
    from retrace import paths
    from retrace.report.provenance import flagged_frame, html_fragment

    models = {
        "m28": {"reference": "fix/like-2.8b", "hub_cache": str(cache), "global_batch": 8, "recipe": "70m",
                "accept": ["step2"]},
        "ok": {"reference": "fix/healthy", "hub_cache": str(cache), "global_batch": 8, "recipe": "70m"},
    }
    cfg = synthetic_study(models=models, parallel=[{"gpus": 1, "pdbs": 8, "gas": 1}])
    cfg["axes"]["model"] = ["m28", "ok"]
    study = load_study(cfg, root=".")
    for repo in ("fix/like-2.8b", "fix/healthy"):
        path = tmp_path / paths.findings(repo)
        path.parent.mkdir(parents=True)
        jobs.write_reference_findings(study, repo, str(path), str(tmp_path / "log"))
    frame = flagged_frame(study, tmp_path)
    assert list(frame["branch"]) == ["main", "step0", "step1", "step2"] and set(frame["repo"]) == {"fix/like-2.8b"}
    assert list(frame["accepted"]) == [False, False, False, True]
    assert frame["findings"].iloc[0].startswith("main-not-final")  # main: another weight set than step8
    assert frame["findings"].iloc[1:].str.startswith("clone-of-final").all()
    fragment = html_fragment(None, frame)
    assert "published steps the audit flags" in fragment and fragment.count("<tr>") == 5


@pytest.mark.slow
def test_snakemake_stops_the_flagged_model_before_training(cache, tmp_path):
    """The real workflow: findings once per repo, the gate refuses the 2.8b-shaped start and never
    schedules its training; the healthy control's gate passes."""
    import yaml

    from snakemake_runner import snakemake

    models = {
        "m28": {"reference": "fix/like-2.8b", "hub_cache": str(cache), "global_batch": 8, "recipe": "70m"},
        "ok": {"reference": "fix/healthy", "hub_cache": str(cache), "global_batch": 8, "recipe": "70m"},
    }
    cfg = synthetic_study(models=models, parallel=[{"gpus": 1, "pdbs": 8, "gas": 1}])
    cfg["axes"]["model"] = ["m28", "ok"]
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(cfg))
    done = snakemake("--configfile", str(tmp_path / "study.yaml"), "--cores", "1", "--keep-going",
                     "results/provenance/m28/start-gate.json", "results/provenance/ok/start-gate.json",
                     workdir=tmp_path, timeout=900)
    assert done.returncode != 0
    assert (tmp_path / "results/provenance/ok/start-gate.json").is_file()
    assert not (tmp_path / "results/provenance/m28/start-gate.json").exists()
    log = (tmp_path / "results/logs/start_gate/m28.log").read_text()
    assert log.startswith("refusing to start from fix/like-2.8b@step0: the audit flags it: clone-of-final")
    assert "retrace: start_gate: refusing to start from fix/like-2.8b@step0" in done.stderr
    assert "models.m28.accept: [step0]" in done.stderr
    dry = snakemake("--configfile", str(tmp_path / "study.yaml"), "-n", workdir=tmp_path, timeout=900)
    assert dry.returncode == 0
    assert "rule start_gate:" in dry.stdout and "wildcards: model=m28" in dry.stdout
