"""The study key `tokenize`, run for real by Snakemake: the tokenize rule writes a data variant's copy
from jsonl, and the variant's pile_data job waits for it. The tokens are checked against a direct
`tokenizers` loop (the reading of GPT-NeoX v1.0's preprocess_data.py --append-eod: ids + EOD 0)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from snakemake_runner import job_counts, snakemake

pytestmark = pytest.mark.slow  # one real Snakemake run

PREFIX = "resources/data/pile-standard/pile_20B_tokenizer_text_document"
WORDS = "the quick brown fox jumps over a lazy dog pythia reads the pile café 日本語".split()


def _tokenizer(path):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    rng = random.Random(0)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|padding|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([" ".join(rng.choice(WORDS) for _ in range(20)) for _ in range(500)], trainer)
    tok.save(str(path))
    return path


def test_the_tokenize_rule_writes_the_variants_copy(tmp_path):
    rng = random.Random(1)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40))) for _ in range(30)]
    jsonl = tmp_path / "part0.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    tok = _tokenizer(tmp_path / "tokenizer.json")
    study = {
        "study": "tiny-tokenize",
        "models": {"m": {"reference": "EleutherAI/pythia-70m"}},
        "data": {"standard-raw": {"source": "pile", "corpus": "standard", "format": "raw", "path": PREFIX}},
        "tokenize": [{"output": PREFIX, "input": [str(jsonl)], "tokenizer": str(tok), "workers": 1}],
        "axes": {"model": ["m"], "data": ["standard-raw"], "parallel": [{"gpus": 32, "pdbs": 32, "gas": 1}],
                 "steps": [4]},
    }
    cfg = tmp_path / "s.yaml"
    cfg.write_text(yaml.safe_dump(study))
    wd = tmp_path / "wd"
    dry = snakemake("-n", "resources/data/pile/standard-raw.json", "--configfile", str(cfg), workdir=wd)
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert job_counts(dry.stdout) == {"tokenize": 1, "pile_data": 1}  # the copy waits for its tokenization

    out = snakemake(f"{PREFIX}.idx", "--cores", "1", "--configfile", str(cfg), workdir=wd)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    from retrace.data.indexed import IndexedDataset

    ds = IndexedDataset(str(wd / PREFIX))
    direct = Tokenizer.from_file(str(tok))
    assert len(ds) == len(texts)
    for i, text in enumerate(texts):
        assert np.array_equal(np.asarray(ds[i], dtype=np.int64), np.array(direct.encode(text).ids + [0]))
