"""retrace.neox.export (HF → GPT-NeoX v1.0 native) and `retrace neox-run` (dry run; GPT-NeoX is not run here)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from retrace.checkpoints import load_client_state, open_params, save_params
from retrace.errors import RetraceError
from retrace.model import GPTNeoX, ModelConfig, config_to_hf, init_weights
from retrace.neox.export import export_neox_checkpoint, inv_freq

CFG = ModelConfig(n_layers=2, hidden=16, heads=2, vocab=64, seq_len=32)
DATA = "/data/pile_deduped/pile_0.87_deduped_text_document"


@pytest.fixture(scope="module")
def params() -> dict[str, torch.Tensor]:
    return init_weights(GPTNeoX(CFG), seed=3).state_dict()


@pytest.fixture()
def reference(tmp_path, params) -> Path:
    ref = tmp_path / "ref"
    save_params(params, ref / "model.safetensors")
    (ref / "config.json").write_text(json.dumps(config_to_hf(CFG)))
    return ref


def test_export_reads_back_as_the_same_canonical_tensors(tmp_path, params):
    out = tmp_path / "load"
    step_dir = export_neox_checkpoint(params, out, step=0, cfg=CFG)
    L = CFG.n_layers
    assert (out / "latest").read_text() == "global_step0" and step_dir == out / "global_step0"
    files = sorted(p.name for p in step_dir.iterdir())
    assert files == [f"layer_{i:02d}-model_00-model_states.pt" for i in (0, 2, 3, L + 3, L + 4)] + [
        "mp_rank_00_model_states.pt"]
    assert not [p for p in out.rglob("*.tmp")]
    layer = torch.load(step_dir / "layer_02-model_00-model_states.pt", weights_only=True)
    assert layer["attention.rotary_emb.inv_freq"].dtype == torch.float16
    assert torch.equal(layer["attention.rotary_emb.inv_freq"], inv_freq(CFG))
    assert torch.load(step_dir / f"layer_{L + 4:02d}-model_00-model_states.pt", weights_only=True).keys() == {
        "final_linear.weight"}
    state = load_client_state(out)
    assert state["iteration"] == 0 and state["args"]["num_layers"] == L and state["args"]["padded_vocab_size"] == 64
    assert torch.load(step_dir / "mp_rank_00_model_states.pt", weights_only=True)["module"] is None
    with open_params(out) as r:
        assert r.names() == list(params)
        for name, t in params.items():
            got = r.get(name)
            assert got.dtype == torch.float16 and torch.equal(got, t.half()), name


def test_sequential_layout_and_a_failing_export_leaves_no_latest(tmp_path, params, monkeypatch):
    seq = tmp_path / "seq"
    export_neox_checkpoint(params, seq, step=0, cfg=CFG, layout="sequential", neox_args={"seq_length": 32})
    assert sorted(p.name for p in (seq / "global_step0").iterdir()) == ["mp_rank_00_model_states.pt"]
    with open_params(seq) as r:
        assert torch.equal(r.get("embed_out.weight"), params["embed_out.weight"].half())
    assert load_client_state(seq)["args"]["seq_length"] == 32

    out = tmp_path / "broken"
    export_neox_checkpoint(params, out, step=0, cfg=CFG)
    calls = []
    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        calls.append(f)
        if len(calls) == 3:
            raise OSError("disk full")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        export_neox_checkpoint(params, out, step=0, cfg=CFG)  # rewriting the step it names drops `latest` first
    assert not (out / "latest").exists() and not list(out.rglob("*.tmp"))
    monkeypatch.undo()
    bad = dict(params)
    del bad["embed_out.weight"]
    with pytest.raises(RetraceError, match="embed_out.weight is missing"):
        export_neox_checkpoint(bad, tmp_path / "bad", step=0, cfg=CFG)
    assert not (tmp_path / "bad").exists()


def test_neox_run_dry_run_exports_writes_the_config_and_prints_the_command(tmp_path, reference, capsys):
    from retrace.cli import main

    out = tmp_path / "run"
    neox = tmp_path / "gpt-neox"
    rc = main(["neox-run", "--reference", str(reference), "--start-step", "0", "--size", "70m", "--deduped",
               "--data", DATA, "--data-kind", "raw", "--gpus", "8", "--pdbs", "4", "--gas", "32", "--steps", "4",
               "--neox-path", str(neox), "--neox-python", sys.executable, "--threads", "2", "--dry-run",
               "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "is not pythia-70m's" in captured.err  # the tiny reference: a warning in a dry run, an error otherwise
    load = out / "neox" / "load"
    assert (load / "latest").read_text() == "global_step0"
    with open_params(load) as r:
        assert r.names() == open_params(reference).names()
    config = yaml.safe_load((out / "neox" / "config.yml").read_text())
    assert config["load"] == str(load.resolve()) and config["finetune"] is True
    assert f"command (not run): cd {neox}" in captured.out and "./deepy.py train.py" in captured.out
    assert not (out / "checkpoints").exists() and not (out / "logs").exists()


def test_neox_run_errors(tmp_path, reference, capsys):
    from retrace.cli import main

    base = ["neox-run", "--reference", str(reference), "--size", "70m", "--data", DATA, "--gpus", "8", "--pdbs", "4",
            "--gas", "32", "--steps", "4", "--out", str(tmp_path / "run")]
    assert main(base + ["--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("error") == 1 and "--neox-path: the gpt-neox v1.0 checkout" in err
    assert main(base + ["--neox-path", str(tmp_path)]) == 2
    assert "no deepy.py there" in capsys.readouterr().err
    (tmp_path / "deepy.py").write_text("")
    assert main(base + ["--neox-path", str(tmp_path)]) == 2  # a real run refuses a reference of the wrong shape
    assert "is not pythia-70m's" in capsys.readouterr().err and not (tmp_path / "run" / "neox").exists()
    assert main(base + ["--neox-path", str(tmp_path), "--data-kind", "preshuffled", "--dry-run"]) == 2
    assert "needs the raw tokenized corpus" in capsys.readouterr().err
    assert main(base + ["--neox-path", str(tmp_path), "--start-step", "1000", "--dry-run",
                        "--reference", "EleutherAI/pythia-70m"]) == 2
    assert "resumes only with its ZeRO optimizer state" in capsys.readouterr().err
