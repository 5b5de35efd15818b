"""Security properties (issue 17): which checkpoint a spec opens, verification that fails closed, pickles
under a torch with a known bypass, and the smaller ones (anchored patterns, temporary names, report text,
report directory swap and mode).

Everything runs on a real huggingface_hub cache written by ``publish_to_hub_cache`` and read offline;
the unreachable-Hub case uses the stand-in Hub API of test_hub.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import time
import warnings
from pathlib import Path

import huggingface_hub
import pandas as pd
import pytest
import torch

from retrace.checkpoints import (
    ALLOW_UNSAFE_PICKLE_ENV,
    ALLOW_UNVERIFIED_ENV,
    open_config,
    open_params,
    publish_dir_to_hub_cache,
    publish_to_hub_cache,
    read_reference_record,
    safe_torch_load,
    save_params,
    start_source,
)
from retrace.checkpoints.hubcache import file_hashes, repo_folder
from retrace.checkpoints.neox import is_neox_dir
from retrace.checkpoints.trust import pickle_bypass
from retrace.cli import main
from retrace.errors import RetraceError
from retrace.io import replace_dir
from retrace.report.build import build_report
from test_checkpoints import CFG, assert_same, write_config
from test_checkpoints import expected as _expected_fixture
from test_checkpoints import shards as _shards_fixture
from test_hub import _fake_api
from test_hub import offline as _offline_fixture
from test_hub import published as _published_fixture
from test_hub import repo_dirs as _repo_dirs_fixture

REPO = "EleutherAI/pythia-tiny"
expected, shards, offline = _expected_fixture, _shards_fixture, _offline_fixture
published, repo_dirs = _published_fixture, _repo_dirs_fixture


def _snapshot_file(cache: Path, revision: str, name: str) -> Path:
    commit = (repo_folder(cache, REPO) / "refs" / revision).read_text()
    return repo_folder(cache, REPO) / "snapshots" / commit / name


def _tamper(path: Path) -> None:
    """Flip one byte near the end of a (safetensors) blob: still readable, different content."""
    blob = path.resolve()
    data = bytearray(blob.read_bytes())
    data[-3] ^= 0xFF
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))


def _drop_cache_metadata(cache: Path, revision: str, *, copies: bool) -> None:
    """A cache as an old huggingface_hub (no tree listings) or a symlink-less filesystem leaves it."""
    for listing in (repo_folder(cache, REPO) / "trees").glob("*.json"):
        listing.unlink()
    if copies:
        folder = _snapshot_file(cache, revision, "")
        for p in folder.rglob("*"):
            if p.is_symlink():
                data = p.read_bytes()
                p.unlink()
                p.write_bytes(data)


# --- item 1: a study file cannot run commands through cluster.gpu_models / gpu_constraints ------------


@pytest.mark.parametrize("key, value", [
    ("gpu_models", "a100 $(touch PWNED)"),
    ("gpu_models", "a100;touch PWNED"),
    ("gpu_models", "a100`touch PWNED`"),
    ("gpu_models", "a100\n"),
    ("gpu_constraints", "ib' --wrap='touch PWNED"),
    ("gpu_constraints", "ib>PWNED"),
])
def test_hostile_scheduler_names_are_refused_when_the_study_is_loaded(key, value, tmp_path, monkeypatch):
    """A value the SLURM plugin's shell would expand never reaches a job: the study fails to load, naming
    the key, and nothing ran (the plugin passes sbatch lines to a shell)."""
    from retrace.grid import load_study
    from study_factory import synthetic_study

    monkeypatch.chdir(tmp_path)
    cfg = synthetic_study(gpu_type=["a100"])
    cfg["cluster"] = {"gpus_per_node": 8, key: {"a100": value}}
    with pytest.raises(RetraceError, match=rf"cluster.*{key}|{key}.*a100"):
        load_study(cfg).cells()
    assert not (tmp_path / "PWNED").exists()


def test_admitted_scheduler_names_reach_sbatch_as_one_unexpanded_word(tmp_path):
    """Names the schema admits may hold characters a shell reads (&, |, [], *): the multi-node
    ``slurm_extra`` quotes them, so a real shell hands sbatch exactly the option written."""
    import subprocess

    from retrace.placement import place

    for word in ["a100_80gb", "nvidia_h100:8", "h100&ib", "a100|h100", "gpu[1-4]", "x*"]:
        (tmp_path / "gpu1").touch()  # a glob match, were the word left unquoted
        p = place(gpus=16, gpu_type="a100", cluster={"gpus_per_node": 8, "threads_per_rank": 1,
                                                     "gpu_models": {"a100": word}, "gpu_constraints": {}})
        out = subprocess.run(["bash", "-c", f"printf '%s\\n' {p.slurm_extra}"], cwd=tmp_path,
                             capture_output=True, text=True, check=True).stdout
        assert out.splitlines() == [f"--gpus-per-node={word}:8"], (word, p.slurm_extra)


# --- item 2: a local directory never silently replaces a Hub reference ------------------------------


def test_folder_named_like_a_hub_spec_does_not_replace_it(published, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    impostor = {k: torch.zeros_like(v) for k, v in expected.items()}
    for name in (f"{REPO}@step0", REPO):  # named like the spec, or left by a download
        save_params(impostor, tmp_path / name / "model.safetensors")
        write_config(tmp_path / name)
    for spec in (f"{REPO}@step0", REPO):
        with pytest.raises(RetraceError, match=rf"'{spec}' is ambiguous.*'\./{spec}'.*'hf://{spec}'"):
            open_params(spec)
    with open_params(f"hf://{REPO}@step0") as r:  # the Hub (here its cache), verified
        assert r.hub.verified
        assert_same(r, expected)
    with open_params(f"./{REPO}@step0") as r:  # a local path written as one
        assert torch.equal(r.get("embed_out.weight"), impostor["embed_out.weight"])


def test_train_start_source_keeps_step0_and_ignores_look_alike_folders(tmp_path, monkeypatch):
    from retrace.checkpoints.sources import start_source

    monkeypatch.chdir(tmp_path)
    assert start_source(REPO, 0) == f"{REPO}@step0"
    assert start_source(f"{REPO}@step7", 0) == f"{REPO}@step7"
    assert start_source(f"hf://{REPO}", 3) == f"hf://{REPO}@step3"
    (tmp_path / REPO).mkdir(parents=True)  # a download left this behind
    with pytest.raises(RetraceError, match="ambiguous"):
        start_source(REPO, 0)  # main returned the folder, without @step0
    assert start_source(f"./{REPO}", 0) == f"./{REPO}"
    assert start_source(tmp_path / REPO, 0) == str(tmp_path / REPO)


def test_a_cell_can_start_from_an_explicit_canonical_reference_file(published, tmp_path, monkeypatch):
    out = tmp_path / "resources" / "references" / REPO / "step0.safetensors"
    assert main(["fetch-reference", "--source", f"{REPO}@step0", "--out", str(out)]) == 0
    assert not (out.parent / "config.json").exists()
    monkeypatch.chdir(tmp_path)
    rel = "./" + str(out.relative_to(tmp_path))
    for source in (str(out), rel):
        assert start_source(source, 0) == source
        assert open_config(source)["hidden_size"] == CFG.hidden  # from the file's own metadata
        with open_params(source) as r:
            assert len(r.names()) == len(CFG.param_shapes())


# --- item 3: verification fails closed ---------------------------------------------------------------


def test_offline_default_verifies_and_refuses_a_tampered_blob(published, monkeypatch):
    with open_params(f"{REPO}@step0") as r:
        assert r.hub.verified and r.hub.verified_against == "cache"
    _tamper(_snapshot_file(published, "step0", "model.safetensors"))
    with pytest.raises(RetraceError, match=r"model.safetensors has sha256 [0-9a-f]{64}, but the local Hub cache"):
        open_params(f"{REPO}@step0")  # no verify= argument: the default
    monkeypatch.setenv(ALLOW_UNVERIFIED_ENV, "1")  # the opt-out allows unverifiable files, never mismatching ones
    with pytest.raises(RetraceError, match="has sha256"):
        open_params(f"{REPO}@step0")
    with pytest.raises(RetraceError, match="has sha256"):
        open_params(f"{REPO}@step0", verify="warn")


def test_unreachable_hub_does_not_let_a_tampered_cache_through(published, repo_dirs, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    api, _, _ = _fake_api(published, repo_dirs, fail=ConnectionError("no route to host"))
    monkeypatch.setattr(huggingface_hub, "HfApi", api)
    _tamper(_snapshot_file(published, "step0", "model.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RetraceError, match="model.safetensors has sha256"):
            open_params(f"{REPO}@step0")


def test_offline_without_tree_listing_uses_the_content_addressed_blob_names(published):
    _drop_cache_metadata(published, "step0", copies=False)
    with open_params(f"{REPO}@step0") as r:
        assert r.hub.verified and r.hub.verified_against == "cache"
    _tamper(_snapshot_file(published, "step0", "model.safetensors"))
    with pytest.raises(RetraceError, match="has sha256"):
        open_params(f"{REPO}@step0")


def test_offline_with_no_record_fails_closed_unless_opted_out(published, expected, monkeypatch):
    _drop_cache_metadata(published, "step0", copies=True)
    with pytest.raises(RetraceError, match=rf"records no sha256.*cannot be verified.*{ALLOW_UNVERIFIED_ENV}=1"):
        open_params(f"{REPO}@step0")
    with pytest.warns(UserWarning, match="unverified"):
        with open_params(f"{REPO}@step0", verify="warn") as r:
            assert not r.hub.verified and r.hub.verified_against == ""
            assert_same(r, expected)
    monkeypatch.setenv(ALLOW_UNVERIFIED_ENV, "1")
    with pytest.warns(UserWarning, match="unverified"):
        with open_params(f"{REPO}@step0") as r:
            assert not r.hub.verified
    with pytest.raises(RetraceError, match="cannot be verified"):
        open_params(f"{REPO}@step0", verify="require")  # an explicit argument wins over the variable
    with pytest.raises(RetraceError, match="verify must be one of"):
        open_params(f"{REPO}@step0", verify="maybe")


def test_fetched_reference_records_commit_and_verification_and_the_report_shows_them(published, tmp_path):
    refs = tmp_path / "resources" / "references"
    for step in (0, 2):
        out = refs / REPO / f"step{step}.safetensors"
        assert main(["fetch-reference", "--source", f"{REPO}@step{step}", "--out", str(out)]) == 0
    rec = read_reference_record(refs / REPO / "step0.safetensors")
    commit = (repo_folder(published, REPO) / "refs" / "step0").read_text()
    assert (rec.repo, rec.revision, rec.step, rec.commit) == (REPO, "step0", 0, commit)
    assert rec.verified and rec.verified_against == "cache"
    blob = _snapshot_file(published, "step0", "model.safetensors").resolve()
    assert rec.files["model.safetensors"] == f"sha256:{file_hashes(blob)[0]}"  # the hash of what was read
    assert rec.files["config.json"].startswith("git-blob:")
    assert set(read_reference_record(refs / REPO / "step2.safetensors").files) == {
        "config.json", "pytorch_model.bin.index.json", *(f"pytorch_model-0000{i}-of-00003.bin" for i in (1, 2, 3))
    }

    tables = tmp_path / "tables"
    _small_similarity(tables)
    report = build_report(tables, tmp_path / "report", references=[refs], log=lambda _: None)
    html = (report / "index.html").read_text()
    assert '<h2 id="references">References</h2>' in html and commit[:12] in html
    assert "All 2 reference files matched" in html
    frame = pd.read_csv(report / "tables" / "references.csv")
    assert list(frame["step"]) == [0, 2] and frame["verified"].all() and set(frame["commit"]) >= {commit}


def test_unverified_fetch_is_recorded_as_such(published, tmp_path):
    _drop_cache_metadata(published, "step0", copies=True)
    out = tmp_path / "step0.safetensors"
    assert main(["fetch-reference", "--source", f"{REPO}@step0", "--out", str(out)]) == 2  # fails closed
    assert not out.exists()
    with pytest.warns(UserWarning, match="unverified"):
        assert main(["fetch-reference", "--source", f"{REPO}@step0", "--out", str(out), "--allow-unverified"]) == 0
    rec = read_reference_record(out)
    assert not rec.verified and rec.commit and rec.files == {}


def test_local_hub_cache_publisher_writes_what_offline_verification_needs(offline, repo_dirs):
    from huggingface_hub._tree_cache import read_tree_cache  # the reader snapshot_download itself uses

    snap = publish_dir_to_hub_cache(offline, REPO, "step9", repo_dirs["safetensors"])
    tree = read_tree_cache(str(repo_folder(offline, REPO)), snap.name)
    sha256 = file_hashes(snap / "model.safetensors")[0]
    assert tree["model.safetensors"].lfs_sha256 == sha256  # huggingface_hub reads the same record
    with open_params(f"{REPO}@step9") as r:
        assert r.hub.verified and r.hub.hashes["model.safetensors"] == f"sha256:{sha256}"


# --- item 4: pickles under a torch with a known weights_only bypass ------------------------------------


def test_pickles_are_refused_under_torch_before_2_6(tmp_path, expected, monkeypatch):
    path = tmp_path / "pytorch_model.bin"
    torch.save(dict(expected), path)
    monkeypatch.setattr(torch, "__version__", "2.4.1+cu121")
    pattern = rf"{path}: refusing to unpickle under torch 2\.4\.1\+cu121.*CVE-2025-32434.*{ALLOW_UNSAFE_PICKLE_ENV}=1"
    with pytest.raises(RetraceError, match=pattern):
        safe_torch_load(path)
    with pytest.raises(RetraceError, match="CVE-2025-32434"):
        open_params(path)
    assert safe_torch_load(path, allow_unsafe_pickle=True).keys() == expected.keys()
    monkeypatch.setenv(ALLOW_UNSAFE_PICKLE_ENV, "1")
    with open_params(path) as r:
        assert_same(r, expected)
    monkeypatch.delenv(ALLOW_UNSAFE_PICKLE_ENV)
    monkeypatch.setattr(torch, "__version__", "2.6.0")
    assert safe_torch_load(path).keys() == expected.keys()


@pytest.mark.parametrize(
    ("version", "unsafe"),
    [("2.4.1", True), ("2.5.1+cu124", True), ("1.13.1", True), ("2.6.0", False), ("2.13.0+cpu", False),
     ("2.7.0a0+git1234", False), ("garbage", True)],
)  # fmt: skip
def test_pickle_bypass_versions(version, unsafe):
    assert (pickle_bypass(version) == "CVE-2025-32434") is unsafe


# --- item 5: anchored patterns, temporary names, report text, report directory ----------------------


def test_patterns_do_not_accept_a_trailing_newline(offline, tmp_path):
    with pytest.raises(RetraceError, match="40 lowercase hex"):
        publish_to_hub_cache(offline, REPO, "x", {"config.json": b"{}"}, commit_hash="a" * 40 + "\n")
    d = tmp_path / "neox"
    d.mkdir()
    (d / "mp_rank_00_model_states.pt\n").write_bytes(b"")
    (d / "global_step1\n").mkdir()
    assert not is_neox_dir(d)
    from retrace.checkpoints.names import sort_key

    assert sort_key("gpt_neox.layers.0.attention.dense.weight\n")[0] == 4  # not a layer parameter
    from retrace.train.state import STATE_JSON, complete_steps

    states = tmp_path / "states"
    for name in ("step4", "step5\n"):
        (states / name).mkdir(parents=True)
        (states / name / STATE_JSON).write_text("{}")
    assert complete_steps(states) == [4]  # "step5\n" is not a state directory


def test_hub_cache_links_are_not_made_at_a_predictable_name(offline):
    commit = "b" * 40
    publish_to_hub_cache(offline, REPO, "x", {"config.json": b"{}"}, commit_hash=commit)
    folder = repo_folder(offline, REPO) / "snapshots" / commit
    planted = folder / f".model.safetensors.{os.getpid()}.lnk"  # the name the old code unlinked and reused
    planted.write_text("not yours")
    publish_to_hub_cache(offline, REPO, "x", {"config.json": b"{}", "model.safetensors": b"w"}, commit_hash=commit)
    assert planted.read_text() == "not yours"
    assert (folder / "model.safetensors").is_symlink() and (folder / "model.safetensors").read_bytes() == b"w"
    assert sorted(p.name for p in folder.iterdir()) == [planted.name, "config.json", "model.safetensors"]


def _small_similarity(tables: Path, model: str = "m", variants=("a", "b")) -> Path:
    rows = []
    for k, data in enumerate(variants, 1):
        for seed in (1, 2):
            for step in (1, 2, 4):
                omc = 1e-4 * k * step * (1 + 0.1 * seed)
                rows.append({"cell": f"c{k}s{seed}", "step": step, "cos": 1 - omc, "one_minus_cos": omc,
                             "l2": 10 * omc, "model": model, "data": data, "seed": seed})  # fmt: skip
    tables.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(tables / "similarity.parquet")
    return tables


def test_report_draws_dollar_signs_as_text(tmp_path):
    tables = _small_similarity(tmp_path / "tables", model=r"$\foo$ model", variants=(r"$\bar$", "b$"))
    out = build_report(tables, tmp_path / "report", log=lambda _: None)
    drawn = {p.name.split("_")[0] for p in (out / "figures").glob("*.png")}
    assert {"trajectory", "factor", "evidence"} <= drawn  # every figure with a $ label was drawn


def test_report_directory_mode_follows_the_umask(tmp_path):
    tables = _small_similarity(tmp_path / "tables")
    old = os.umask(0o027)
    try:
        out = build_report(tables, tmp_path / "report", log=lambda _: None)
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o750
    assert (out / "tables").stat().st_mode & 0o777 == 0o750
    assert (out / "verdict.json").stat().st_mode & 0o777 == 0o640


def _writer(out: str, ident: int, rounds: int, errors) -> None:
    out_path = Path(out)
    for i in range(rounds):
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", dir=out_path.parent))
        for j in range(3):
            (tmp / f"part{j}").write_text(f"{ident}.{i}")
        (tmp / "verdict.json").write_text("{}")  # what a report holds (main refuses other directories)
        try:
            replace_dir(tmp, out_path)
        except Exception as exc:  # noqa: BLE001 - reported to the test
            errors.put(f"{ident}: {type(exc).__name__}: {exc}")
            return


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_concurrent_directory_replacements_never_lose_the_directory(tmp_path, monkeypatch, exchange):
    """Three processes replace one directory 80 times each: none fails, and with an atomic exchange a
    reader never finds it missing. Without one (filesystems that cannot exchange) the lock still keeps
    concurrent replacements from failing; only the never-missing guarantee is lost."""
    import retrace.io

    if exchange:
        (tmp_path / "x").mkdir()
        (tmp_path / "y").mkdir()
        if not retrace.io._exchange(tmp_path / "x", tmp_path / "y"):
            pytest.skip("this filesystem cannot exchange two paths atomically")
        (tmp_path / "x").rmdir()
        (tmp_path / "y").rmdir()
    else:
        monkeypatch.setattr(retrace.io, "_exchange", lambda a, b: False)
    out = tmp_path / "report"
    ctx = multiprocessing.get_context("fork")
    errors = ctx.Queue()
    first = Path(tempfile.mkdtemp(dir=tmp_path))
    (first / "verdict.json").write_text("{}")
    replace_dir(first, out)
    procs = [ctx.Process(target=_writer, args=(str(out), n, 80, errors)) for n in range(3)]
    for p in procs:
        p.start()
    missing = 0
    while any(p.is_alive() for p in procs):
        missing += not out.is_dir()
        time.sleep(0)
    for p in procs:
        p.join()
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert not found
    assert missing == 0 or not exchange
    contents = {(out / f"part{j}").read_text() for j in range(3)}
    assert len(contents) == 1  # one writer's whole directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # nothing temporary left
