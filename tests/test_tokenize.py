"""`retrace tokenize`: GPT-NeoX v1.0 preprocess_data.py --append-eod semantics, parallel, resumable, atomic.

The expected output is computed independently: the jsonl is read with the standard library, each text is
encoded by a direct `tokenizers` loop (`Tokenizer.encode(text).ids` + `<|endoftext|>`, v1.0's HFTokenizer),
and the .bin/.idx bytes are assembled by hand from the MMapIndexedDataset layout (reference §4).
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zstandard
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from retrace.cli import main
from retrace.data import tokenize as tk
from retrace.data.indexed import IndexedDataset
from retrace.data.tokenize import TokenizeInputError, tokenize_corpus
from retrace.errors import RetraceError

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the quick brown fox jumps over a lazy dog while pythia reads the pile in order seed shard "
         "token neox café naïve 日本語 ✓").split()
EDGE_TEXTS = [
    "",  # dropped (preprocess_data.py filters empty texts)
    "héllo wörld ✓ 日本語 — “quotes”",
    "line one\u2028line two\u0085next\r\nwindows\nunix",  # separators a str.splitlines reader would break on
    "  leading and trailing spaces  ",
    "x" * 5000,
    "\t",
]


def _text(rng: random.Random, n_words: tuple[int, int] = (1, 80)) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(*n_words)))


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> Path:
    """A tiny byte-level BPE (like the 20B tokenizer's), <|endoftext|> = 0, saved as tokenizer.json."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    rng = random.Random(0)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|padding|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_text(rng) for _ in range(2000)], trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def _write_jsonl(path: Path, records: list, newline: str = "\n") -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + newline for r in records), encoding="utf-8")
    return path


def _corpus_records(n: int, seed: int = 1) -> list:
    rng = random.Random(seed)
    records: list = [{"text": _text(rng), "meta": {"i": i}} for i in range(n)]
    for k, t in enumerate(EDGE_TEXTS):
        records.insert(3 + 7 * k, {"text": t, "meta": {}})
    records.insert(5, {"meta": {}, "text": ["para one", "para two"]})  # joined with "\n\n"
    records.insert(9, "a bare JSON string is the text itself")  # lm_dataformat's legacy form
    return records


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return _write_jsonl(tmp_path_factory.mktemp("corpus") / "part.jsonl", _corpus_records(400))


def _zst(src: Path, dst: Path, frames: int = 1) -> Path:
    """Compress ``src`` into ``dst`` as ``frames`` concatenated zstd frames."""
    data = src.read_bytes()
    cut = [len(data) * k // frames for k in range(frames + 1)]
    cctx = zstandard.ZstdCompressor(level=3)
    dst.write_bytes(b"".join(cctx.compress(data[a:b]) for a, b in zip(cut, cut[1:], strict=False)))
    return dst


def expected_files(paths: list[Path], tokenizer: Path) -> tuple[bytes, bytes]:
    """(.bin, .idx) bytes by hand: stdlib json + a direct `tokenizers` loop + the documented layout."""
    tok = Tokenizer.from_file(str(tokenizer))
    eod = tok.token_to_id("<|endoftext|>")
    docs = []
    for path in paths:
        raw = path.read_bytes()
        if path.name.endswith(".zst"):
            raw = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True).read()
        for line in raw.decode("utf-8").split("\n"):
            if not line:
                continue
            ob = json.loads(line)
            text = ob if isinstance(ob, str) else ob["text"]
            if isinstance(text, list):
                text = "\n\n".join(text)
            if text:
                docs.append(tok.encode(text).ids + [eod])
    assert tok.get_vocab_size() < 65500
    binary = b"".join(struct.pack(f"<{len(d)}H", *d) for d in docs)
    sizes = [len(d) for d in docs]
    pointers = [2 * sum(sizes[:i]) for i in range(len(sizes))]
    idx = (b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8)
           + struct.pack("<QQ", len(docs), len(docs) + 1) + struct.pack(f"<{len(sizes)}i", *sizes)
           + struct.pack(f"<{len(pointers)}q", *pointers) + struct.pack(f"<{len(docs) + 1}q", *range(len(docs) + 1)))
    return binary, idx


def _read(prefix: Path) -> tuple[bytes, bytes]:
    return Path(f"{prefix}.bin").read_bytes(), Path(f"{prefix}.idx").read_bytes()


def _leftovers(prefix: Path) -> list[str]:
    return sorted(p.name for p in prefix.parent.iterdir()) if prefix.parent.exists() else []


def test_matches_a_direct_tokenizers_loop(tmp_path, corpus, tokenizer_path):
    out = tmp_path / "out" / "pile_text_document"
    lines = []
    res = tokenize_corpus(inputs=[corpus], tokenizer=tokenizer_path, output=out, log=lines.append,
                          progress_seconds=0)
    want_bin, want_idx = expected_files([corpus], tokenizer_path)
    assert _read(out) == (want_bin, want_idx)
    assert _leftovers(out) == ["pile_text_document.bin", "pile_text_document.idx"]  # no work dir, no lock
    n_docs = len(want_idx[34:]) // 20  # 4 (size) + 8 (pointer) + 8 (doc_idx) bytes per document, +8
    assert res.documents == n_docs == 400 + len(EDGE_TEXTS) + 2 - 1  # the empty text is dropped
    assert res.lines == 400 + len(EDGE_TEXTS) + 2
    assert res.tokens == len(want_bin) // 2 and res.tokenizer.eod_id == 0 and res.tokenizer.dtype == "uint16"
    assert any(line.startswith("tokenize: file 1/1") for line in lines)
    with IndexedDataset(out) as ds:  # every document ends with EOD
        assert all(ds[i][-1] == 0 for i in range(len(ds)))


def test_zst_multi_frame_and_several_files_in_order(tmp_path, corpus, tokenizer_path):
    second = _write_jsonl(tmp_path / "b.jsonl", _corpus_records(120, seed=5), newline="\r\n")
    zst = _zst(corpus, tmp_path / "a.jsonl.zst", frames=3)
    out = tmp_path / "zst"
    tokenize_corpus(inputs=[zst, second], tokenizer=tokenizer_path, output=out, shard_bytes=3000)
    assert _read(out) == expected_files([corpus, second], tokenizer_path)


def test_two_workers_equal_one_byte_for_byte(tmp_path, corpus, tokenizer_path):
    outs = {}
    for workers in (1, 2):
        outs[workers] = tmp_path / f"w{workers}"
        res = tokenize_corpus(inputs=[corpus], tokenizer=tokenizer_path, output=outs[workers], workers=workers,
                              shard_bytes=2000)
        assert res.shards > 20
    assert _read(outs[1]) == _read(outs[2]) == expected_files([corpus], tokenizer_path)


def test_special_tokens_are_added_as_encode_does_by_default(tmp_path, corpus, tokenizer_path):
    """HFTokenizer.tokenize calls encode(text) with add_special_tokens left on: the post-processor runs."""
    tok = Tokenizer.from_file(str(tokenizer_path))
    tok.post_processor = processors.TemplateProcessing(single="<|padding|> $A", special_tokens=[("<|padding|>", 1)])
    path = tmp_path / "with_template.json"
    tok.save(str(path))
    out = tmp_path / "tpl"
    tokenize_corpus(inputs=[corpus], tokenizer=path, output=out)
    assert _read(out) == expected_files([corpus], path)
    with IndexedDataset(out) as ds:
        assert all(ds[i][0] == 1 for i in range(len(ds)))


def test_large_vocabulary_gives_int32(tmp_path):
    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(65_600)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = tmp_path / "big.json"
    tok.save(str(path))
    src = _write_jsonl(tmp_path / "c.jsonl", [{"text": "w65000 w3"}, {"text": "nope w65599"}])
    tokenize_corpus(inputs=[src], tokenizer=path, output=tmp_path / "big")
    with IndexedDataset(tmp_path / "big") as ds:
        assert ds.dtype == np.dtype("<i4") and ds.dtype_code == 4
        assert [ds[i].tolist() for i in range(len(ds))] == [[65002, 5, 0], [1, 65601, 0]]


# -- bad input: one clear error naming file and line, nothing left behind ----------------------------

def _strip_tokenizer(tmp_path: Path, tokenizer_path: Path) -> Path:
    """The same tokenizer with a Strip normalizer: a whitespace-only text encodes to no tokens."""
    tok = Tokenizer.from_file(str(tokenizer_path))
    tok.normalizer = normalizers.Strip()
    path = tmp_path / "strip.json"
    tok.save(str(path))
    return path


BAD_LINES = {
    "not_json": (b'{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n', 3, "not JSON"),
    "missing_key": (b'{"text": "ok"}\n{"content": "x", "meta": {}}\n', 2, "no 'text' key (keys: 'content', 'meta')"),
    "blank_line": (b'{"text": "ok"}\n\n{"text": "ok"}\n', 2, "empty line"),
    "not_utf8": (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', 2, "not UTF-8"),
    "null_text": (b'{"text": null}\n', 1, "'text' is a JSON NoneType, expected a string"),
    "number_text": (b'{"text": "a"}\n{"text": 5}\n', 2, "'text' is a JSON int"),
    "array_line": (b'{"text": "a"}\n[1, 2]\n', 2, "a JSON list, expected an object"),
    "encodes_to_nothing": (b'{"text": "a"}\n{"text": "   "}\n', 2, "encodes to no tokens"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.zst"])
def test_bad_line_names_file_and_line(tmp_path, tokenizer_path, case, suffix):
    data, line, message = BAD_LINES[case]
    src = tmp_path / f"in{suffix}"
    src.write_bytes(zstandard.ZstdCompressor().compress(data) if suffix.endswith(".zst") else data)
    tok = _strip_tokenizer(tmp_path, tokenizer_path) if case == "encodes_to_nothing" else tokenizer_path
    out = tmp_path / "out" / "doc"
    with pytest.raises(TokenizeInputError) as err:
        tokenize_corpus(inputs=[src], tokenizer=tok, output=out)
    assert str(err.value).startswith(f"{src}:{line}: ") and message in str(err.value)
    assert _leftovers(out) == []


def test_bad_line_deep_in_a_parallel_run_names_its_line(tmp_path, corpus, tokenizer_path):
    lines = corpus.read_bytes().split(b"\n")
    lines[300] = b'{"text": "unterminated'
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b"\n".join(lines))
    out = tmp_path / "out" / "doc"
    with pytest.raises(TokenizeInputError, match=rf"^{src}:301: not JSON"):
        tokenize_corpus(inputs=[src], tokenizer=tokenizer_path, output=out, workers=2, shard_bytes=1500)
    assert _leftovers(out) == []


@pytest.mark.parametrize("what", ["empty", "empty_zst", "suffix", "missing", "all_texts_empty"])
def test_bad_files(tmp_path, corpus, tokenizer_path, what):
    paths = {
        "empty": (tmp_path / "e.jsonl", b"", "empty input file"),
        "empty_zst": (tmp_path / "e.jsonl.zst", zstandard.ZstdCompressor().compress(b""), "empty input file"),
        "suffix": (tmp_path / "e.json", b'{"text": "a"}\n', "unsupported input"),
        "missing": (tmp_path / "nope.jsonl", None, "no such file"),
        "all_texts_empty": (tmp_path / "blank.jsonl", b'{"text": ""}\n{"text": ""}\n', "no documents"),
    }
    path, data, message = paths[what]
    if data is not None:
        path.write_bytes(data)
    out = tmp_path / "out" / "doc"
    inputs = [corpus, path] if what == "empty" else [path]  # an empty file after a good one is refused first
    with pytest.raises(TokenizeInputError, match=message) as err:
        tokenize_corpus(inputs=inputs, tokenizer=tokenizer_path, output=out)
    assert str(path) in str(err.value)
    assert not out.parent.exists() or _leftovers(out) == []


def test_truncated_zst_is_an_error(tmp_path, corpus, tokenizer_path):
    whole = _zst(corpus, tmp_path / "t.jsonl.zst").read_bytes()
    src = tmp_path / "cut.jsonl.zst"
    src.write_bytes(whole[: len(whole) // 2])
    out = tmp_path / "out" / "doc"
    with pytest.raises(TokenizeInputError, match=rf"^{src}: .*truncated zstd data"):
        tokenize_corpus(inputs=[src], tokenizer=tokenizer_path, output=out, shard_bytes=1000)
    assert _leftovers(out) == []


def test_bad_tokenizers(tmp_path, corpus, tokenizer_path):
    no_eod = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    no_eod.save(str(tmp_path / "no_eod.json"))
    (tmp_path / "junk.json").write_text("{not a tokenizer")
    for path, message in ((tmp_path / "no_eod.json", "no '<|endoftext|>' token"),
                          (tmp_path / "junk.json", "not a Hugging Face tokenizer.json"),
                          (tmp_path / "absent.json", "no such tokenizer file")):
        with pytest.raises(RetraceError, match=message):
            tokenize_corpus(inputs=[corpus], tokenizer=path, output=tmp_path / "out" / "doc")
    assert _leftovers(tmp_path / "out" / "doc") == []


def test_cli_error_is_one_line_with_exit_2(tmp_path, tokenizer_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"text": "a"}\n{"txt": "b"}\n')
    rc = main(["tokenize", "--input", str(src), "--tokenizer", str(tokenizer_path), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and f"retrace tokenize: error: {src}:2: no 'text' key" in err


def test_cli_summary(tmp_path, corpus, tokenizer_path, capsys):
    out, summary = tmp_path / "o", tmp_path / "summary.json"
    rc = main(["tokenize", "--input", str(corpus), "--tokenizer", str(tokenizer_path), "--output", str(out),
               "--workers", "1", "--shard-bytes", "4096", "--summary", str(summary)])
    assert rc == 0
    s = json.loads(summary.read_text())
    assert s["documents"] == 407 and s["tokenizer"]["eod_id"] == 0 and s["shards"] > 5
    assert s["tokenizer"]["sha256"] == tk.sha256_file(tokenizer_path)
    assert _read(out) == expected_files([corpus], tokenizer_path)


# -- resumption ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_resume_after_sigkill_gives_the_same_bytes(tmp_path, tokenizer_path):
    """A real `retrace tokenize` process group (main + 2 workers) is SIGKILLed mid-run, then run again."""
    src = _write_jsonl(tmp_path / "big.jsonl", _corpus_records(8_000, seed=3))
    ref = tmp_path / "ref"
    tokenize_corpus(inputs=[src], tokenizer=tokenizer_path, output=ref, shard_bytes=20_000)
    out = tmp_path / "run" / "doc"
    cmd = [sys.executable, "-m", "retrace", "tokenize", "--input", str(src), "--tokenizer", str(tokenizer_path),
           "--output", str(out), "--shard-bytes", "20000", "--progress-seconds", "1000"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "workflow")}
    proc = subprocess.Popen([*cmd, "--workers", "2"], env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    state = tk.work_dir_for(out) / "state.json"
    deadline = time.monotonic() + 60
    merged = 0
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            merged = json.loads(state.read_text())["merged_shards"]
        except (OSError, ValueError, KeyError):
            merged = 0
        if merged >= 3:
            break
        time.sleep(0.005)
    assert proc.poll() is None, proc.stderr.read().decode()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert not Path(f"{out}.idx").exists() and not Path(f"{out}.bin").exists()
    assert tk.work_dir_for(out).is_dir()
    summary = tmp_path / "summary.json"
    rerun = subprocess.run([*cmd, "--workers", "1", "--summary", str(summary)], env=env, check=True,
                           capture_output=True, text=True)
    assert _read(out) == _read(ref)
    assert "discarding" not in rerun.stderr
    assert json.loads(summary.read_text())["resumed_shards"] >= 3
    assert _leftovers(out) == ["doc.bin", "doc.idx"]


class _Crash(Exception):
    pass


def test_resume_after_a_crash_between_merges(tmp_path, corpus, tokenizer_path):
    out = tmp_path / "doc"
    seen = []

    def crash_after_five(line: str) -> None:
        seen.append(line)
        if len(seen) == 5:
            raise _Crash

    with pytest.raises(_Crash):
        tokenize_corpus(inputs=[corpus], tokenizer=tokenizer_path, output=out, shard_bytes=2000,
                        log=crash_after_five, progress_seconds=0)
    assert not Path(f"{out}.bin").exists() and tk.work_dir_for(out).is_dir()
    res = tokenize_corpus(inputs=[corpus], tokenizer=tokenizer_path, output=out, shard_bytes=2000, workers=2)
    assert res.resumed_shards >= 4 and res.documents == 407
    assert _read(out) == expected_files([corpus], tokenizer_path)


def test_resume_after_a_crash_between_the_two_renames(tmp_path, corpus, tokenizer_path, monkeypatch):
    out = tmp_path / "doc"
    real = os.replace
    calls = []

    def replace_then_fail(a, b):
        calls.append(b)
        if str(b).endswith("doc.idx"):
            raise OSError("simulated crash")
        return real(a, b)

    monkeypatch.setattr(tk.os, "replace", replace_then_fail)
    with pytest.raises(OSError, match="simulated crash"):
        tokenize_corpus(inputs=[corpus], tokenizer=tokenizer_path, output=out, shard_bytes=5000)
    monkeypatch.setattr(tk.os, "replace", real)
    assert Path(f"{out}.bin").exists() and not Path(f"{out}.idx").exists()
    tokenize_corpus(inputs=[corpus], tokenizer=tokenizer_path, output=out, shard_bytes=5000)
    assert _read(out) == expected_files([corpus], tokenizer_path)
    assert _leftovers(out) == ["doc.bin", "doc.idx"]


def test_stale_work_directory_is_discarded(tmp_path, corpus, tokenizer_path):
    out = tmp_path / "doc"
    with pytest.raises(_Crash):
        tokenize_corpus(inputs=[corpus], tokenizer=tokenizer_path, output=out, shard_bytes=2000,
                        log=lambda _m: (_ for _ in ()).throw(_Crash), progress_seconds=0)
    notes = []
    res = tokenize_corpus(inputs=[corpus], tokenizer=tokenizer_path, output=out, shard_bytes=3000,
                          log=notes.append, progress_seconds=1000)
    assert res.resumed_shards == 0 and any("discarding" in n for n in notes)
    assert _read(out) == expected_files([corpus], tokenizer_path)


def test_a_second_run_on_the_same_output_is_refused(tmp_path, corpus, tokenizer_path):
    out = tmp_path / "doc"
    with open(f"{out}.tokenize-lock", "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        with pytest.raises(RetraceError, match="another `retrace tokenize`"):
            tokenize_corpus(inputs=[corpus], tokenizer=tokenizer_path, output=out)
    assert not Path(f"{out}.bin").exists()


def test_truncated_zst_after_good_lines_names_the_last_good_line(tmp_path, tokenizer_path):
    src = _write_jsonl(tmp_path / "long.jsonl", _corpus_records(3000, seed=9))
    whole = _zst(src, tmp_path / "long.jsonl.zst").read_bytes()
    cut = tmp_path / "cut.jsonl.zst"
    cut.write_bytes(whole[: len(whole) * 3 // 4])
    out = tmp_path / "out" / "doc"
    with pytest.raises(TokenizeInputError, match=rf"^{cut}: cannot read after line \d+: truncated zstd data"):
        tokenize_corpus(inputs=[cut], tokenizer=tokenizer_path, output=out, shard_bytes=50_000)
    assert _leftovers(out) == []


def test_not_zstd_at_all(tmp_path, corpus, tokenizer_path):
    src = tmp_path / "fake.jsonl.zst"
    src.write_bytes(corpus.read_bytes())
    with pytest.raises(TokenizeInputError, match=rf"^{src}: cannot read: "):
        tokenize_corpus(inputs=[src], tokenizer=tokenizer_path, output=tmp_path / "o")


def test_benchmark_smoke():
    """benchmarks/tokenize_throughput.py --smoke: runs, and 1 and 2 workers agree with the direct loop."""
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tokenize_throughput.py"), "--smoke"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "retrace tokenize --workers 2" in run.stdout and "vs loop" in run.stdout
