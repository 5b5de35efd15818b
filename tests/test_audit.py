"""retrace.audit: fixture repos in a real huggingface_hub cache (publish_to_hub_cache), audited offline.

Each repo is built in the shape of one incident of the seeds' blog or of pythia-neox.md §6, with tiny
tensors and the Pythia schedule cut at step 8 (step0, 1, 2, 4, 8 and main), and the audit must classify
it; a healthy control must come out clean. Byte identity is real (the same file published on several
branches), never asserted by the fixture.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from retrace.audit import CacheMetadata, audit, format_revisions, parse_steps, pythia_steps, weight_kind
from retrace.checkpoints import publish_to_hub_cache, save_params
from retrace.cli import main as cli_main
from retrace.errors import RetraceError

MAX = 8
STEPS = [0, 1, 2, 4, 8]
NAMES = {
    "gpt_neox.embed_in.weight": (16, 8),
    "gpt_neox.layers.0.attention.query_key_value.weight": (24, 8),
    "gpt_neox.layers.0.attention.query_key_value.bias": (24,),
    "embed_out.weight": (16, 8),
}


def theta(t: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny trajectory θ(t) = θ0 + t·δ in fp16: distance from θ0 grows with t."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in NAMES.items():
        base = torch.randn(shape, generator=g) * 0.05
        delta = torch.randn(shape, generator=g) * 0.01
        out[name] = (base + t * delta).half()
    return out


class Files:
    """Weight files written once, so that publishing one on several branches shares its bytes."""

    def __init__(self, root):
        self.root = root
        self.n = 0

    def _path(self, name):
        self.n += 1
        d = self.root / f"f{self.n}"
        d.mkdir(parents=True)
        return d / name

    def safetensors(self, params, tag="") -> dict:
        return {
            "model.safetensors": save_params(params, self._path("model.safetensors"), metadata={"tag": tag})
        }

    def bin(self, params) -> dict:
        path = self._path("pytorch_model.bin")
        torch.save(dict(params), path)
        return {"pytorch_model.bin": path}

    def bin_sharded(self, shards: list[dict]) -> dict:
        n = len(shards)
        out, weight_map = {}, {}
        for k, part in enumerate(shards):
            name = f"pytorch_model-{k + 1:05d}-of-{n:05d}.bin"
            path = self._path(name)
            torch.save(dict(part), path)
            out[name] = path
            weight_map.update(dict.fromkeys(part, name))
        out["pytorch_model.bin.index.json"] = json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
        return out


def split(params: dict) -> list[dict]:
    names = list(params)
    return [{k: params[k] for k in names[:2]}, {k: params[k] for k in names[2:]}]


CONFIG = {"config.json": b'{"model_type": "gpt_neox"}'}


def publish(cache, repo, branches: dict[str, dict]) -> None:
    for rev, files in branches.items():
        publish_to_hub_cache(cache, repo, rev, {**CONFIG, **files})


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    cache = root / "hub"
    f = Files(root / "files")

    # healthy control: step1 = step0 byte for byte (LR 0), main = step8.
    step = {s: f.bin(theta(s)) for s in (0, 2, 4, 8)}
    publish(cache, "fix/healthy", {"step0": step[0], "step1": step[0], "step2": step[2], "step4": step[4],
                                   "step8": step[8], "main": step[8]})  # fmt: skip

    # generation 3: every checkpoint is a clone of the final.
    final = f.bin(theta(8, seed=3))
    publish(cache, "fix/gen3", {**{f"step{s}": final for s in STEPS}, "main": final})

    # generation 4, standard: all checkpoints identical (one weight set on every step branch; main differs).
    same = f.bin(theta(0, seed=4))
    publish(
        cache, "fix/gen4-standard", {**{f"step{s}": same for s in STEPS}, "main": f.bin(theta(8, seed=4))}
    )

    # a "standard" repo whose every checkpoint is byte-identical to a "deduped" repo's, step for step.
    dd = {s: f.bin(theta(s, seed=40)) for s in STEPS}
    publish(cache, "fix/twin-deduped", {**{f"step{s}": dd[s] for s in STEPS}, "main": dd[8]})
    publish(cache, "fix/twin-standard", {**{f"step{s}": dd[s] for s in STEPS}, "main": dd[8]})

    # generation 5: model.safetensors and sharded .bin in every revision; at step4 they disagree.
    gen5 = {}
    for s in STEPS:
        p = theta(s, seed=5)
        shards = split(theta(s + 0.5, seed=5)) if s == 4 else split(p)
        gen5[f"step{s}"] = {**f.safetensors(p, tag=f"step{s}"), **f.bin_sharded(shards)}
    gen5["main"] = gen5["step8"]
    publish(cache, "fix/gen5", gen5)

    # missing revisions: no step4, no step8 (main is the last one uploaded).
    miss = {s: f.bin(theta(s, seed=6)) for s in (0, 2)}
    publish(cache, "fix/missing", {"step0": miss[0], "step1": miss[0], "step2": miss[2], "main": miss[2]})

    # like pythia-2.8b (#195): early branches serve main's weights; main differs from the final step.
    p28 = {s: f.bin(theta(s, seed=7)) for s in (4, 8)}
    final28 = f.bin(theta(9, seed=7))
    publish(cache, "fix/like-2.8b", {"step0": final28, "step1": final28, "step2": final28, "step4": p28[4],
                                     "step8": p28[8], "main": final28})  # fmt: skip

    # like pythia-12b (#206): step4's second shard is the final model's.
    sh = {s: f.bin_sharded(split(theta(s, seed=8))) for s in STEPS}
    mixed = dict(sh[4])
    mixed["pytorch_model-00002-of-00002.bin"] = sh[8]["pytorch_model-00002-of-00002.bin"]
    publish(cache, "fix/like-12b", {**{f"step{s}": sh[s] for s in STEPS}, "step4": mixed, "main": sh[8]})

    # a format change: sharded .bin everywhere but step2, which has a single pytorch_model.bin.
    fc = {s: f.bin_sharded(split(theta(s, seed=9))) for s in STEPS}
    fc[2] = f.bin(theta(2, seed=9))
    publish(cache, "fix/format-change", {**{f"step{s}": fc[s] for s in STEPS}, "main": fc[8]})

    # weights: step4 holds step2's parameters (new bytes), step8 lies closer to step0 than step4 does.
    w = {s: theta(s, seed=10) for s in STEPS}
    mv = {
        "step0": f.safetensors(w[0], "0"),
        "step1": f.safetensors(w[0], "1"),  # same parameters, new bytes: expected (LR 0)
        "step2": f.safetensors(w[2], "2"),
        "step4": f.safetensors(w[2], "4"),  # does not move
        "step8": f.safetensors(theta(1, seed=10), "8"),  # moves backwards
    }
    mv["main"] = mv["step8"]
    publish(cache, "fix/moves", mv)
    return cache


def run(cache, *repos, **kw):
    return audit(list(repos), CacheMetadata(cache), max_step=MAX, **kw)


# ------------------------------------------------------------------------------------------------


def test_schedule():
    steps = pythia_steps()
    assert len(steps) == 154
    assert steps[:12] == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000]
    assert steps[-1] == 143000 and steps[-2] == 142000
    assert parse_steps("0,1,step2,1000-3000") == {0, 1, 2, 1000, 2000, 3000}
    with pytest.raises(RetraceError, match="--steps"):
        parse_steps("x")
    assert format_revisions(["step0", "step1", "step2", "step8", "main"]) == "step0–step2 (3), step8, main"


def test_weight_kinds():
    assert weight_kind("model.safetensors") == "safetensors"
    assert weight_kind("model-00001-of-00002.safetensors") == "safetensors-sharded"
    assert weight_kind("pytorch_model.bin") == "bin"
    assert weight_kind("pytorch_model-00002-of-00003.bin") == "bin-sharded"
    assert weight_kind("global_step143000/layer_00-model_00-model_states.pt") == "neox"
    assert weight_kind("global_step143000/zero_pp_rank_0_mp_rank_00_optim_states.pt") == "neox-optim"
    for name in ("config.json", "pytorch_model.bin.index.json", "tokenizer.json", "training_args.bin"):
        assert weight_kind(name) is None


def test_offline_metadata_reads_sha256_from_blob_names(cache):
    src = CacheMetadata(cache)
    revs = src.revisions("fix/healthy")
    assert set(revs) == {"step0", "step1", "step2", "step4", "step8", "main"}
    f0 = {f.name: f for f in revs["step0"].files}
    w = f0["pytorch_model.bin"]
    blob = cache / "models--fix--healthy" / "blobs" / w.sha256
    assert blob.is_file() and w.size == blob.stat().st_size and w.local
    assert f0["config.json"].sha256 is None and len(f0["config.json"].blob_id) == 40
    assert revs["step0"].fingerprint("bin") == revs["step1"].fingerprint("bin")
    assert revs["step0"].fingerprint("bin") != revs["step2"].fingerprint("bin")


def test_offline_metadata_without_tree_listing(cache, tmp_path):
    """Older huggingface_hub caches have no trees/*.json: the snapshot's symlinks give the same hashes."""
    import shutil

    copy = tmp_path / "hub"
    shutil.copytree(cache / "models--fix--gen3", copy / "models--fix--gen3", symlinks=True)
    shutil.rmtree(copy / "models--fix--gen3" / "trees")
    a = CacheMetadata(cache).revisions("fix/gen3")
    b = CacheMetadata(copy).revisions("fix/gen3")
    for rev in a:
        assert a[rev].fingerprint("bin") == b[rev].fingerprint("bin")
    report = audit(["fix/gen3"], CacheMetadata(copy), max_step=MAX)
    assert report.kinds("fix/gen3") == {"clone-of-final"}


def test_not_in_cache(cache):
    with pytest.raises(RetraceError, match="fix/nope: not in the local hub cache"):
        run(cache, "fix/nope")


def test_healthy_control_is_clean(cache):
    report = run(cache, "fix/healthy")
    assert report.incidents == []
    assert report.kinds("fix/healthy") == set()
    assert report.status("fix/healthy", "step1") == "alias"  # = step0, expected
    assert report.status("fix/healthy", "step8") == "alias"  # = main, expected
    assert {report.status("fix/healthy", r) for r in ("step0", "step2", "step4", "main")} == {"ok"}
    assert {(n.kind, n.repo) for n in report.notes} == {
        ("step1-alias", "fix/healthy"),
        ("main-alias", "fix/healthy"),
    }
    assert "no incidents" in report.render() and "clean: fix/healthy" in report.render()


def test_generation3_every_checkpoint_a_clone_of_the_final(cache):
    report = run(cache, "fix/gen3")
    assert report.kinds("fix/gen3") == {"clone-of-final"}
    (inc,) = report.incidents_of("clone-of-final")
    assert inc.reference == "main"
    assert inc.revisions == ["step0", "step1", "step2", "step4"]  # step8 = main is expected
    assert "every step branch" in inc.detail
    frame = report.frame()
    rows = frame[frame.revision.isin(inc.revisions)]
    assert set(rows.status) == {"clone"} and set(rows.clone_of) == {"main"}


def test_generation4_all_checkpoints_identical(cache):
    report = run(cache, "fix/gen4-standard")
    assert report.kinds("fix/gen4-standard") == {"all-identical", "main-not-final"}
    (inc,) = report.incidents_of("all-identical")
    assert inc.reference == "step8" and "all 5 step branches" in inc.detail


def test_repo_identical_to_another_repo(cache):
    report = run(cache, "fix/twin-deduped", "fix/twin-standard")
    assert report.kinds("fix/twin-deduped") == set()
    assert report.kinds("fix/twin-standard") == {"cross-repo"}
    (inc,) = report.incidents_of("cross-repo")
    assert inc.reference == "fix/twin-deduped"
    assert "all 6 revisions byte-identical to fix/twin-deduped at the same revision" in inc.detail
    assert report.frame().query("repo == 'fix/twin-standard' and revision == 'step4'").clone_of.item() == (
        "fix/twin-deduped@step4"
    )


def test_generation5_two_formats_from_metadata(cache):
    report = run(cache, "fix/gen5")
    assert report.kinds("fix/gen5") == {"two-formats"}
    (inc,) = report.incidents_of("two-formats")
    assert inc.revisions == ["step0", "step1", "step2", "step4", "step8", "main"]
    assert "run with --weights" in inc.detail


def test_generation5_formats_disagree_with_weights(cache):
    report = run(cache, "fix/gen5", weights=True)
    assert report.kinds("fix/gen5") == {"formats-disagree"}
    (inc,) = report.incidents_of("formats-disagree")
    assert inc.revisions == ["step4"]
    frame = report.frame().set_index(["revision", "file"])
    assert frame.loc[("step4", "model.safetensors"), "formats_max_abs_diff"] > 0
    assert frame.loc[("step2", "model.safetensors"), "formats_max_abs_diff"] == 0
    assert report.status("fix/gen5", "step2") == "ok"


def test_missing_revisions(cache):
    report = run(cache, "fix/missing")
    assert report.kinds("fix/missing") == {"missing"}
    assert report.missing == {"fix/missing": ["step4", "step8"]}
    rows = report.frame().query("status == 'missing'")
    assert list(rows.revision) == ["step4", "step8"] and rows.file.isna().all()
    # --steps narrows what is expected
    assert run(cache, "fix/missing", steps={0, 1, 2}).incidents == []


def test_like_pythia_2_8b(cache):
    report = run(cache, "fix/like-2.8b")
    assert report.kinds("fix/like-2.8b") == {"clone-of-final", "main-not-final"}
    (inc,) = report.incidents_of("clone-of-final")
    assert inc.revisions == ["step0", "step1", "step2"] and inc.reference == "main"


def test_like_pythia_12b_shard_clone(cache):
    report = run(cache, "fix/like-12b")
    assert report.kinds("fix/like-12b") == {"shard-clone"}
    (inc,) = report.incidents_of("shard-clone")
    assert inc.revisions == ["step4"]
    assert "pytorch_model-00002-of-00002.bin = main" in inc.detail
    frame = report.frame().query("revision == 'step4'").set_index("file")
    assert frame.loc["pytorch_model-00002-of-00002.bin", "status"] == "shard-clone"
    assert frame.loc["pytorch_model-00001-of-00002.bin", "status"] == "ok"


def test_format_change(cache):
    report = run(cache, "fix/format-change")
    assert report.kinds("fix/format-change") == {"format-change"}
    (inc,) = report.incidents_of("format-change")
    assert inc.revisions == ["step2"]
    assert "bin-sharded (5)" in inc.detail and "bin (1: step2)" in inc.detail


def test_weights_not_moving_and_backwards(cache):
    report = run(cache, "fix/moves")
    assert report.incidents == []  # different bytes everywhere: nothing to see in metadata
    report = run(cache, "fix/moves", weights=True)
    assert report.kinds("fix/moves") == {"not-moving", "backwards"}
    assert report.incidents_of("not-moving")[0].revisions == ["step4"]  # step1 = step0 is expected
    assert report.incidents_of("backwards")[0].revisions == ["step8"]
    frame = report.frame().set_index("revision")
    assert frame.loc["step4", "one_minus_cos_prev"] == 0 and frame.loc["step4", "l2_prev"] == 0
    assert frame.loc["step2", "one_minus_cos_prev"] > 0
    assert frame.loc["step8", "l2_anchor"] < frame.loc["step4", "l2_anchor"]
    # a threshold on 1 − cos catches slow movers too
    loose = run(cache, "fix/moves", weights=True, still_threshold=1.0)
    assert loose.incidents_of("not-moving")[0].revisions == ["step2", "step4", "step8"]


def test_all_fixtures_together_and_summary(cache):
    repos = ["fix/healthy", "fix/gen3", "fix/gen4-standard", "fix/gen5", "fix/missing", "fix/like-12b"]
    report = run(cache, *repos)
    text = report.render()
    # grouped by kind, in the order of INCIDENT_KINDS
    order = [
        text.index(h)
        for h in ("clone-of-final:", "all-identical:", "shard-clone:", "missing:", "two-formats:")
    ]
    assert order == sorted(order)
    assert "clean: fix/healthy" in text
    # no clone links between unrelated repos
    assert not report.incidents_of("cross-repo")
    json.dumps(report.to_dict(), allow_nan=False)


def test_cli_writes_parquet_and_summary(cache, tmp_path, capsys):
    pq, summary = tmp_path / "audit.parquet", tmp_path / "audit.txt"
    rc = cli_main([
        "audit", "fix/healthy", "fix/gen3", "fix/missing", "--offline", "--cache-dir", str(cache),
        "--max-step", str(MAX), "--parquet", str(pq), "--summary", str(summary),
    ])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert out == summary.read_text()
    assert "clone-of-final" in out and "missing" in out
    frame = pd.read_parquet(pq)
    assert list(frame.columns[:11]) == [
        "repo", "revision", "commit", "step", "file", "kind", "size", "sha256", "clone_of", "status", "issues",
    ]  # fmt: skip
    assert len(frame) == 6 + 6 + (4 + 2)  # one row per weight file; missing revisions one row each
    assert frame.attrs["audit"]["repos"] == ["fix/healthy", "fix/gen3", "fix/missing"]
    assert cli_main(["audit", "fix/gen3", "--offline", "--cache-dir", str(cache), "--max-step", "8",
                     "--fail-on-incident", "--quiet"]) == 1  # fmt: skip
    assert cli_main(["audit", "fix/nope", "--offline", "--cache-dir", str(cache)]) == 2


def test_partial_cache_metadata_from_tree_listing(cache, tmp_path):
    """A cache holding only part of a revision (e.g. config.json) still gives its full file list and sha256s
    (huggingface_hub's trees/<commit>.json); --weights then reports what it could not read."""
    import shutil

    copy = tmp_path / "hub"
    shutil.copytree(cache / "models--fix--moves", copy / "models--fix--moves", symlinks=True)
    src = CacheMetadata(copy)
    step4 = src.revisions("fix/moves")["step4"]
    (copy / "models--fix--moves" / "snapshots" / step4.commit / "model.safetensors").unlink()
    again = CacheMetadata(copy).revisions("fix/moves")["step4"]
    st = next(f for f in again.files if f.name == "model.safetensors")
    assert not st.local and st.sha256 == next(f for f in step4.files if f.name == "model.safetensors").sha256
    report = audit(["fix/moves"], CacheMetadata(copy), max_step=MAX, weights=True)
    (inc,) = report.incidents_of("weights-unavailable")
    assert "step4" in inc.revisions and "not in the local cache" in inc.detail
    assert report.status("fix/moves", "step4") == "weights-unavailable"
    assert report.status("fix/moves", "step8") == "backwards"  # step8 itself was read (against step0)


def test_main_with_an_added_safetensors_is_not_a_format_change(cache, tmp_path):
    """Pythia's main got model.safetensors from the SFconvertbot PR beside its pytorch_model.bin: that is
    "two formats: verify", and main = the final step by its .bin, not a format change."""
    import shutil

    copy = tmp_path / "hub"
    shutil.copytree(cache / "models--fix--healthy", copy / "models--fix--healthy", symlinks=True)
    files = Files(tmp_path / "files")
    step8 = CacheMetadata(copy).revisions("fix/healthy")["step8"]
    folder = copy / "models--fix--healthy" / "snapshots" / step8.commit
    publish_to_hub_cache(
        copy,
        "fix/healthy",
        "main",
        {**CONFIG, "pytorch_model.bin": folder / "pytorch_model.bin", **files.safetensors(theta(8), "bot")},
    )
    report = audit(["fix/healthy"], CacheMetadata(copy), max_step=MAX)
    assert report.kinds("fix/healthy") == {"two-formats"}
    assert report.status("fix/healthy", "step8") == "alias"
    assert run(copy, "fix/healthy", weights=True).incidents == []
