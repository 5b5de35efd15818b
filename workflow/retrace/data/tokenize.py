"""Tokenize a jsonl / jsonl.zst corpus into a GPT-NeoX indexed dataset, as GPT-NeoX v1.0 did for Pythia.

What GPT-NeoX v1.0 (commit ``71df4d5017f9f4919566a11454fe3a507ffdc632``) does with
``tools/preprocess_data.py --tokenizer-type HFTokenizer --vocab-file tokenizer.json --append-eod``, and
what this module reproduces:

* **Reading** (``preprocess_data.py`` ``yield_from_files``, l.151-167, through lm_dataformat
  ``4eec0534`` ``Reader.read_jsonl`` / ``read_jsonl_zst``, l.240-249, and ``handle_jsonl``, l.104-120):
  each line is one JSON value (``jsonlines``, stdlib ``json``). An object gives its ``"text"`` value (the
  ``--jsonl-keys`` default, ``preprocess_data.py`` l.75-79); a bare JSON string is the text itself; a list
  of paragraphs is joined with ``"\\n\\n"``. Files are read in the order given.
* **Empty documents are dropped**: ``filter(lambda x: x, ...)`` (``preprocess_data.py`` l.160) skips an
  empty text before encoding, so it makes no item and no ``doc_idx`` entry.
* **Encoding** (``megatron/tokenizer/tokenizer.py`` ``HFTokenizer``, l.224-258):
  ``tokenizers.Tokenizer.from_file(tokenizer.json).encode(text).ids``, i.e. with the library's default
  ``add_special_tokens=True`` (the post-processor runs); no ``ftfy`` (off by default, l.114).
* **EOD**: ``--append-eod`` appends ``tokenizer.token_to_id("<|endoftext|>")`` to the document's ids
  (``Encoder.encode`` l.55-59; ``HFTokenizer.eod``). For every Pythia tokenizer that id is 0
  (:data:`retrace.pythia.constants.EOD_TOKEN`).
* **A document whose encoding is empty** makes v1.0 fail (``doc_ids`` is empty, so ``doc_ids[-1]`` raises
  IndexError, l.56-59): no corpus v1.0 produced contains one. We stop with an error naming file and line.
* **One item per document** (``main`` l.219-224: one ``add_item`` of ids + EOD, then ``end_document``), so
  ``doc_idx = [0, 1, ..., N]`` (``megatron/data/indexed_dataset.py`` ``MMapIndexedDatasetBuilder``, l.562-597).
* **dtype**: ``make_builder(..., vocab_size=tokenizer.vocab_size)`` (``indexed_dataset.py`` l.28-33, 53-57)
  with ``vocab_size = Tokenizer.get_vocab_size()`` (added tokens included): uint16 when < 65500, else int32.
* **Output name**: v1.0 writes ``{output_prefix}_text_document.{bin,idx}``; here ``output`` is the whole
  prefix (Pythia's standard Pile: ``…/pile_20B_tokenizer_text_document``).

Where we differ, always by refusing input v1.0 would have mishandled: a blank line, a line that is not
JSON or not UTF-8, a missing text key, a text that is neither a string nor a list of strings (v1.0 skips
``null``/``0``/``false`` silently and crashes on other types), an empty file: each is a
:class:`TokenizeInputError` naming ``file:line``. A ``.zst`` file is read across all its zstd frames
(lm_dataformat's reader stopped after the first; the Pile's files have one). v1.0 pinned
``tokenizers==0.12.1``; the output depends on the installed version only if BPE encoding changed, which
``retrace order-check`` against a published preshuffled stream would show.

How the work is split (so it runs in parallel, resumes after a kill, and writes atomically): the main
process reads the inputs in shards of about ``shard_bytes`` of uncompressed text (cut at line ends: the
shards depend only on the inputs and ``shard_bytes``, never on ``workers``); a pool of ``workers``
processes tokenizes them into ``{prefix}.tokenize-work/shards/FFFFF-CCCCCCC.{bin,sizes.npy}`` (each renamed
into place when complete; the ``.sizes.npy`` last marks the shard done). Shards are appended, in order, to
``work/merged.bin``, and ``work/state.json`` records how many are merged (after an fsync), so a shard's
``.bin`` can go as soon as it is merged: peak disk is about the output plus the shards in flight. At the
end the ``.idx`` is written, the pair is validated, and both are renamed onto ``{prefix}.bin`` then
``{prefix}.idx``; the work directory is removed. A rerun after a kill reuses every merged or finished shard;
a work directory left by a run over other inputs/tokenizer/options is discarded. Bad input removes the
work directory and leaves no output.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from retrace.data.indexed import IndexedDataset, best_fitting_dtype, split_prefix, write_index
from retrace.errors import RetraceError
from retrace.io import _fsync_dir, _fsync_file, atomic_path, sha256_file, write_json

#: Format tag of the work directory's plan (a different tag is a stale directory).
WORK_FORMAT = "retrace-tokenize-work/1"
#: Uncompressed input bytes per shard (a shard is the unit of parallel work and of resumption).
DEFAULT_SHARD_BYTES = 16 << 20
#: The token v1.0 appends after every document (``HFTokenizer.eod``).
EOD_TEXT = "<|endoftext|>"
INPUT_SUFFIXES = (".jsonl", ".jsonl.zst")
#: The text key v1.0 reads (``--jsonl-keys`` default).
TEXT_KEY = "text"

Log = Callable[[str], None]


class TokenizeInputError(RetraceError):
    """The input corpus is unusable (the message names file and line); the run's partial work is removed."""


# -- the tokenizer --------------------------------------------------------------------------------

@dataclass(frozen=True)
class TokenizerInfo:
    """What the output depends on: the tokenizer file (by hash), its EOD id, and the token dtype."""

    path: str
    sha256: str
    vocab_size: int
    eod_id: int
    dtype: str


def _load_tokenizer(path: str | os.PathLike):
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:  # a declared dependency; say which one is missing
        raise RetraceError("retrace tokenize needs the Hugging Face `tokenizers` package") from exc
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # the library raises plain Exception subclasses for a bad file
        raise RetraceError(f"{path}: not a Hugging Face tokenizer.json ({exc})") from exc


def tokenizer_info(path: str | os.PathLike) -> TokenizerInfo:
    """Load ``tokenizer.json`` and describe it (v1.0 ``HFTokenizer``: EOD = ``<|endoftext|>``).

    Raises:
        RetraceError: no such file, not a tokenizer, or no ``<|endoftext|>`` token.
    """
    path = Path(path)
    if not path.is_file():
        raise RetraceError(f"{path}: no such tokenizer file")
    tok = _load_tokenizer(path)
    eod = tok.token_to_id(EOD_TEXT)
    if eod is None:
        raise RetraceError(f"{path}: the tokenizer has no {EOD_TEXT!r} token, which GPT-NeoX's HFTokenizer "
                           "appends after every document")
    vocab = int(tok.get_vocab_size())
    return TokenizerInfo(path=str(path.resolve()), sha256=sha256_file(path), vocab_size=vocab, eod_id=int(eod),
                         dtype=str(best_fitting_dtype(vocab)))


# -- reading the corpus ---------------------------------------------------------------------------

def check_input(path: Path) -> None:
    """A readable ``.jsonl``/``.jsonl.zst`` file that is not empty, or TokenizeInputError."""
    if not path.name.endswith(INPUT_SUFFIXES):
        raise TokenizeInputError(f"{path}: unsupported input (expected one of {', '.join(INPUT_SUFFIXES)})")
    if not path.is_file():
        raise TokenizeInputError(f"{path}: no such file")
    with open_text_stream(path) as (stream, _raw):
        try:
            first = stream.read(1)
        except Exception as exc:  # a corrupt or truncated .zst
            raise TokenizeInputError(f"{path}: cannot read: {exc}") from exc
    if not first:
        raise TokenizeInputError(f"{path}: empty input file (no lines)")


@contextlib.contextmanager
def open_text_stream(path: Path) -> Iterator[tuple[io.BufferedIOBase, io.BufferedIOBase]]:
    """(the uncompressed byte stream, the raw file) of a ``.jsonl`` or ``.jsonl.zst`` file."""
    with open(path, "rb") as raw:
        if path.name.endswith(".zst"):
            with io.BufferedReader(_ZstdFrames(raw, path), buffer_size=1 << 20) as stream:
                yield stream, raw
        else:
            yield raw, raw


class _ZstdFrames(io.RawIOBase):
    """Every zstd frame of a file, decompressed in order; a truncated last frame is an error.

    (``zstandard``'s ``stream_reader`` ends silently at a truncated frame, which would drop the tail of a
    cut-off download without a word.)
    """

    def __init__(self, raw, path: Path, chunk: int = 1 << 20):
        import zstandard

        self._raw, self._path, self._chunk = raw, path, chunk
        self._dctx = zstandard.ZstdDecompressor()
        self._obj = None
        self._pending = b""  # compressed bytes after the end of the last frame
        self._out = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not len(self._out):
            data = self._pending or self._raw.read(self._chunk)
            self._pending = b""
            if not data:
                if self._obj is not None and not self._obj.eof:
                    raise OSError("truncated zstd data: the last frame is incomplete")
                return 0
            if self._obj is None or self._obj.eof:
                self._obj = self._dctx.decompressobj()
            self._out = memoryview(self._obj.decompress(data))
            if self._obj.eof:
                self._pending = self._obj.unused_data
        n = min(len(buffer), len(self._out))
        buffer[:n] = self._out[:n]
        self._out = self._out[n:]
        return n


def read_shards(stream: io.BufferedIOBase, shard_bytes: int) -> Iterator[bytes]:
    """Whole lines, about ``shard_bytes`` at a time: ``shard_bytes`` bytes, then on to the next newline."""
    while True:
        parts = []
        want = shard_bytes
        while want > 0:  # a short read happens only at EOF, but do not rely on it
            block = stream.read(want)
            if not block:
                break
            parts.append(block)
            want -= len(block)
        if not parts:
            return
        if not parts[-1].endswith(b"\n"):
            parts.append(stream.readline())
        yield b"".join(parts)


def line_count(data: bytes) -> int:
    """Lines in a shard (the last line may lack its newline)."""
    return data.count(b"\n") + (0 if data.endswith(b"\n") else 1)


def document_text(line: bytes, *, where: str, key: str = TEXT_KEY) -> str:
    """The text of one jsonl line (lm_dataformat ``handle_jsonl``), or TokenizeInputError naming ``where``."""
    try:
        s = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TokenizeInputError(f"{where}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not s.strip():
        raise TokenizeInputError(f"{where}: empty line (every line must be one JSON document)")
    try:
        obj = json.loads(s)
    except json.JSONDecodeError as exc:
        raise TokenizeInputError(f"{where}: not JSON ({exc.msg} at column {exc.colno})") from None
    if isinstance(obj, str):  # lm_dataformat's legacy form: the line is the text
        return obj
    if not isinstance(obj, dict):
        raise TokenizeInputError(f"{where}: a JSON {type(obj).__name__}, expected an object with a {key!r} key")
    if key not in obj:
        keys = ", ".join(repr(k) for k in list(obj)[:8])
        raise TokenizeInputError(f"{where}: no {key!r} key (keys: {keys or 'none'})")
    text = obj[key]
    if isinstance(text, list) and all(isinstance(t, str) for t in text):
        return "\n\n".join(text)  # lm_dataformat autojoin_paragraphs
    if not isinstance(text, str):
        raise TokenizeInputError(f"{where}: {key!r} is a JSON {type(text).__name__}, expected a string")
    return text


def encode_shard(tokenizer, data: bytes, *, path: str, first_line: int, eod_id: int, dtype,
                 key: str = TEXT_KEY) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize one shard of lines: ``(tokens, sizes)``, each document's ids + EOD, empty texts dropped.

    Raises:
        TokenizeInputError: a bad line, or a text that encodes to no tokens (``path:line`` in the message).
    """
    dtype = np.dtype(dtype)
    lines = data.split(b"\n")
    if data.endswith(b"\n"):
        lines.pop()
    flat: list[int] = []
    sizes: list[int] = []
    for n, line in enumerate(lines):
        where = f"{path}:{first_line + n}"
        text = document_text(line, where=where, key=key)
        if not text:
            continue  # preprocess_data.py: filter(lambda x: x, ...)
        try:
            ids = tokenizer.encode(text).ids
        except Exception as exc:
            raise TokenizeInputError(f"{where}: the tokenizer cannot encode this text ({exc})") from None
        if not ids:
            raise TokenizeInputError(f"{where}: the text ({len(text)} characters) encodes to no tokens; "
                                     "GPT-NeoX v1.0's preprocess_data.py fails on such a document")
        flat.extend(ids)
        flat.append(eod_id)
        sizes.append(len(ids) + 1)
    tokens = np.asarray(flat, dtype=np.int64)
    if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(dtype).max):
        raise TokenizeInputError(f"{path}: token ids up to {int(tokens.max())} do not fit {dtype}")
    return tokens.astype(dtype.newbyteorder("<")), np.asarray(sizes, dtype=np.int32)


# -- shards on disk -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shard:
    """One unit of work: lines ``[first_line, first_line + lines)`` of input ``file``."""

    index: int
    file: int
    chunk: int
    path: str
    first_line: int
    lines: int
    nbytes: int

    @property
    def name(self) -> str:
        return f"{self.file:05d}-{self.chunk:07d}"


def shard_bin(shards_dir: Path, shard: Shard) -> Path:
    return shards_dir / f"{shard.name}.bin"


def shard_sizes(shards_dir: Path, shard: Shard) -> Path:
    return shards_dir / f"{shard.name}.sizes.npy"


def _write_shard(shards_dir: Path, shard: Shard, tokens: np.ndarray, sizes: np.ndarray) -> None:
    with atomic_path(shard_bin(shards_dir, shard), suffix=".bin") as tmp:
        tmp.write_bytes(tokens.tobytes())
    with atomic_path(shard_sizes(shards_dir, shard), suffix=".npy") as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, sizes, allow_pickle=False)


def _read_sizes(path: Path) -> np.ndarray | None:
    try:
        sizes = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    return sizes if sizes.dtype == np.int32 and sizes.ndim == 1 else None


def _shard_done(shards_dir: Path, shard: Shard, itemsize: int) -> np.ndarray | None:
    """The shard's sizes if both its files are complete, else None."""
    sizes = _read_sizes(shard_sizes(shards_dir, shard))
    if sizes is None:
        return None
    try:
        nbytes = shard_bin(shards_dir, shard).stat().st_size
    except FileNotFoundError:
        return None
    return sizes if nbytes == int(sizes.sum(dtype=np.int64)) * itemsize else None


# -- worker processes -----------------------------------------------------------------------------

_WORKER: dict = {}


def _init_worker(tokenizer_path: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one CPU per worker, as the user asked
    _WORKER["tokenizer"] = _load_tokenizer(tokenizer_path)


def _tokenize_shard(shards_dir: str, shard: Shard, data: bytes, eod_id: int, dtype: str, key: str) -> None:
    tokens, sizes = encode_shard(_WORKER["tokenizer"], data, path=shard.path, first_line=shard.first_line,
                                 eod_id=eod_id, dtype=dtype, key=key)
    _write_shard(Path(shards_dir), shard, tokens, sizes)


# -- the run --------------------------------------------------------------------------------------

@dataclass
class TokenizeResult:
    """What a run wrote (``documents``/``tokens`` are the whole output, ``resumed_shards`` were reused)."""

    prefix: str
    documents: int
    tokens: int
    lines: int
    input_bytes: int
    shards: int
    resumed_shards: int
    seconds: float
    workers: int
    tokenizer: TokenizerInfo
    inputs: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        d = asdict(self)
        d["docs_per_second"] = round(self.documents / self.seconds, 1) if self.seconds else None
        d["tokens_per_second"] = round(self.tokens / self.seconds, 1) if self.seconds else None
        return d


def work_dir_for(prefix: Path) -> Path:
    return Path(f"{prefix}.tokenize-work")


def _plan(inputs: Sequence[Path], info: TokenizerInfo, shard_bytes: int, key: str) -> dict:
    files = []
    for p in inputs:
        st = p.stat()
        files.append({"path": str(p.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
    return {"format": WORK_FORMAT, "inputs": files, "tokenizer_sha256": info.sha256, "eod_id": info.eod_id,
            "dtype": info.dtype, "shard_bytes": int(shard_bytes), "key": key}


@contextlib.contextmanager
def _exclusive(prefix: Path) -> Iterator[Path]:
    """Hold ``{prefix}.tokenize-lock`` (flock) for the run; a second run on the same output is refused."""
    lock = Path(f"{prefix}.tokenize-lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+b") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RetraceError(f"{prefix}: another `retrace tokenize` is writing this output ({lock} is locked)") from None
        try:
            yield lock
        finally:
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()


def _open_work(work: Path, plan: dict, say: Log) -> dict:
    """Create the work directory or reuse a matching one; returns its merge state."""
    plan_path = work / "plan.json"
    if work.exists():
        try:
            old = json.loads(plan_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
        if old != plan:
            say(f"tokenize: discarding {work} (left by a run over other inputs, tokenizer or options)")
            shutil.rmtree(work)
    if not work.exists():
        (work / "shards").mkdir(parents=True)
        write_json(plan_path, plan)
    try:
        state = json.loads((work / "state.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        state = {"merged_shards": 0, "merged_bytes": 0, "documents": 0, "tokens": 0, "lines": 0,
                 "input_bytes": 0, "final": False}
    except (OSError, ValueError):
        say(f"tokenize: {work}/state.json unreadable; starting over")
        shutil.rmtree(work)
        return _open_work(work, plan, say)
    return state


class _Progress:
    def __init__(self, say: Log, every: float, total_bytes: int, n_files: int):
        self.say, self.every, self.total_bytes, self.n_files = say, every, total_bytes, n_files
        self.t0 = self.last = time.perf_counter()
        self.new_docs = self.new_tokens = 0
        self.done_bytes = 0  # raw (compressed) input bytes of finished files
        self.skip_t, self.skip_frac = self.t0, 0.0  # time and input fraction of the last reused shard

    def _frac(self, raw_pos: int) -> float:
        return (self.done_bytes + raw_pos) / self.total_bytes if self.total_bytes else 1.0

    def reused(self, raw_pos: int) -> None:
        self.skip_t, self.skip_frac = time.perf_counter(), self._frac(raw_pos)

    def report(self, *, file: int, raw_pos: int, state: dict, resumed: int, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last < self.every:
            return
        self.last = now
        dt = max(now - self.t0, 1e-9)
        frac = self._frac(raw_pos)
        eta = ""
        if self.skip_frac < frac < 1 and self.new_docs:  # from the pace since the last reused shard
            eta = f", about {_duration((now - self.skip_t) * (1 - frac) / (frac - self.skip_frac))} left"
        self.say(f"tokenize: file {file + 1}/{self.n_files}, {state['merged_shards']} shards merged "
                 f"({resumed} reused), {state['documents']:,} documents, {state['tokens']:,} tokens, "
                 f"{frac:.1%} of the input; {self.new_docs / dt:,.0f} docs/s, {self.new_tokens / dt:,.0f} "
                 f"tokens/s{eta}")


def _duration(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def tokenize_corpus(*, inputs: Sequence[str | os.PathLike], tokenizer: str | os.PathLike,
                    output: str | os.PathLike, workers: int = 1, shard_bytes: int = DEFAULT_SHARD_BYTES,
                    key: str = TEXT_KEY, log: Log | None = None, progress_seconds: float = 30.0,
                    ) -> TokenizeResult:
    """Tokenize ``inputs`` (in order) into ``output.bin``/``output.idx`` as v1.0 ``--append-eod`` does.

    Args:
        inputs: ``.jsonl`` / ``.jsonl.zst`` files, read in this order.
        tokenizer: the model's ``tokenizer.json``.
        output: the prefix of the ``.bin``/``.idx`` pair (a ``.bin``/``.idx`` suffix is dropped).
        workers: tokenizing processes (1: in this process). The output does not depend on it.
        shard_bytes: uncompressed bytes per shard (the unit of work and of resumption). A rerun with another
            value starts over.
        key: the JSON key holding the text.
        log: receives progress lines (default: stderr).
        progress_seconds: at most one progress line per this many seconds.

    Returns:
        What was written, with counts and timings.

    Raises:
        TokenizeInputError: bad input (named ``file:line``); no output and no work directory remain.
        RetraceError: a bad tokenizer, or another run holds the output.
    """
    say = log or (lambda m: print(m, file=sys.stderr, flush=True))
    if workers < 1:
        raise RetraceError(f"workers must be >= 1, got {workers}")
    if shard_bytes < 1:
        raise RetraceError(f"shard_bytes must be >= 1, got {shard_bytes}")
    paths = [Path(p) for p in inputs]
    if not paths:
        raise TokenizeInputError("no input files")
    for p in paths:
        check_input(p)
    info = tokenizer_info(tokenizer)
    prefix = split_prefix(output)
    work = work_dir_for(prefix)
    t0 = time.perf_counter()
    with _exclusive(prefix):
        try:
            state = _open_work(work, _plan(paths, info, shard_bytes, key), say)
            run = _Run(paths, info, prefix, work, state, workers, shard_bytes, key, say, progress_seconds)
            counts = run.execute()
        except TokenizeInputError:
            shutil.rmtree(work, ignore_errors=True)
            raise
    return TokenizeResult(prefix=str(prefix), documents=counts["documents"], tokens=counts["tokens"],
                          lines=counts["lines"], input_bytes=counts["input_bytes"], shards=counts["shards"],
                          resumed_shards=counts["resumed"], seconds=round(time.perf_counter() - t0, 3),
                          workers=workers, tokenizer=info, inputs=[str(p) for p in paths])


class _Run:
    """One pass over the inputs: tokenize missing shards, merge in order, finalize."""

    def __init__(self, paths, info: TokenizerInfo, prefix: Path, work: Path, state: dict, workers: int,
                 shard_bytes: int, key: str, say: Log, progress_seconds: float):
        self.paths, self.info, self.prefix, self.work, self.state = paths, info, prefix, work, state
        self.workers, self.shard_bytes, self.key, self.say = workers, shard_bytes, key, say
        self.progress_seconds = progress_seconds
        self.shards_dir = work / "shards"
        self.merged = work / "merged.bin"
        self.merged_idx = work / "merged.idx"
        self.dtype = np.dtype(info.dtype).newbyteorder("<")
        self.shards: list[Shard] = []
        self.resumed = 0

    # -- phase 1: shards ---------------------------------------------------------------------
    def execute(self) -> dict:
        if self.state.get("final"):
            return self._finish_renames()
        self._open_merged()
        pool = None
        if self.workers > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_init_worker, initargs=(self.info.path,))
        else:
            _WORKER["tokenizer"] = _load_tokenizer(self.info.path)
        pending: deque = deque()  # (shard, future or None, tokenized by this run), in input order
        total_raw = sum(p.stat().st_size for p in self.paths)
        progress = _Progress(self.say, self.progress_seconds, total_raw, len(self.paths))
        try:
            for fi, path in enumerate(self.paths):
                first_line, chunk = 1, 0
                with open_text_stream(path) as (stream, raw):
                    reader = read_shards(stream, self.shard_bytes)
                    while True:
                        try:
                            data = next(reader, None)
                        except Exception as exc:  # zstd errors and the like: report earlier shards first
                            self._drain(pending, progress, 0)
                            raise TokenizeInputError(f"{path}: cannot read after line {first_line - 1}: {exc}") from exc
                        if data is None:
                            break
                        shard = Shard(len(self.shards), fi, chunk, str(path), first_line, line_count(data),
                                      len(data))
                        self.shards.append(shard)
                        first_line += shard.lines
                        chunk += 1
                        future, fresh = self._start(pool, shard, data)
                        if not fresh:
                            progress.reused(raw.tell())
                        pending.append((shard, future, fresh))
                        self._drain(pending, progress, 2 * self.workers)
                        progress.report(file=fi, raw_pos=raw.tell(), state=self.state, resumed=self.resumed)
                if chunk == 0:
                    self._drain(pending, progress, 0)
                    raise TokenizeInputError(f"{path}: empty input file (no lines)")
                progress.done_bytes += path.stat().st_size
            self._drain(pending, progress, 0)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            self._close_merged()
        progress.report(file=len(self.paths) - 1, raw_pos=0, state=self.state, resumed=self.resumed, force=True)
        return self._finalize()

    def _start(self, pool, shard: Shard, data: bytes) -> tuple:
        """(future or None, fresh): reuse a merged or finished shard; else submit it (or do it now, serially)."""
        if shard.index < self.state["merged_shards"] or \
                _shard_done(self.shards_dir, shard, self.dtype.itemsize) is not None:
            self.resumed += 1
            return None, False
        args = (str(self.shards_dir), shard, data, self.info.eod_id, self.info.dtype, self.key)
        if pool is None:
            _tokenize_shard(*args)
            return None, True
        return pool.submit(_tokenize_shard, *args), True

    def _drain(self, pending: deque, progress: _Progress, keep: int) -> None:
        """Merge finished shards from the head, in order, until at most ``keep`` remain pending."""
        while pending and (len(pending) > keep or pending[0][1] is None or pending[0][1].done()):
            shard, future, fresh = pending.popleft()
            if future is not None:
                future.result()  # a worker's TokenizeInputError surfaces here, in input order
            if shard.index < self.state["merged_shards"]:
                continue
            sizes = self._merge(shard)
            if fresh:
                progress.new_docs += sizes.size
                progress.new_tokens += int(sizes.sum(dtype=np.int64))

    # -- merging -----------------------------------------------------------------------------
    def _open_merged(self) -> None:
        want = int(self.state["merged_bytes"])
        have = self.merged.stat().st_size if self.merged.exists() else 0
        if have < want:  # cannot happen unless the work directory was tampered with
            raise RetraceError(f"{self.merged} has {have} bytes but {self.work}/state.json records {want}; "
                               f"delete {self.work} to start over")
        self._fh = open(self.merged, "r+b" if self.merged.exists() else "w+b")  # noqa: SIM115 - closed in _close_merged
        self._fh.truncate(want)
        self._fh.seek(want)

    def _close_merged(self) -> None:
        fh = getattr(self, "_fh", None)
        if fh is not None and not fh.closed:
            fh.close()

    def _merge(self, shard: Shard) -> np.ndarray:
        sizes = _shard_done(self.shards_dir, shard, self.dtype.itemsize)
        if sizes is None:
            raise RetraceError(f"internal error: shard {shard.name} is not complete in {self.shards_dir}")
        with open(shard_bin(self.shards_dir, shard), "rb") as src:
            shutil.copyfileobj(src, self._fh, 8 << 20)
        self._fh.flush()
        os.fsync(self._fh.fileno())
        st = self.state
        st["merged_shards"] = shard.index + 1
        st["merged_bytes"] = self._fh.tell()
        st["documents"] += int(sizes.size)
        st["tokens"] += int(sizes.sum(dtype=np.int64))
        st["lines"] += shard.lines
        st["input_bytes"] += shard.nbytes
        write_json(self.work / "state.json", st)
        shard_bin(self.shards_dir, shard).unlink()  # merged: only its sizes are still needed
        return sizes

    # -- phase 2: the index and the renames ----------------------------------------------------
    def _finalize(self) -> dict:
        st = self.state
        if st["merged_shards"] != len(self.shards):
            raise RetraceError(f"internal error: {st['merged_shards']} of {len(self.shards)} shards merged")
        parts = []
        for shard in self.shards:
            sizes = _read_sizes(shard_sizes(self.shards_dir, shard))
            if sizes is None:
                raise RetraceError(f"{shard_sizes(self.shards_dir, shard)}: missing or unreadable; delete "
                                   f"{self.work} to start over")
            parts.append(sizes)
        sizes = np.concatenate(parts) if parts else np.zeros(0, np.int32)
        if sizes.size == 0:
            raise TokenizeInputError(f"{', '.join(map(str, self.paths))}: no documents (every text is empty)")
        if sizes.size != st["documents"] or int(sizes.sum(dtype=np.int64)) != st["tokens"]:
            raise RetraceError(f"internal error: shard sizes disagree with {self.work}/state.json")
        write_index(self.merged_idx, self.dtype, sizes, np.arange(sizes.size + 1, dtype=np.int64))
        _fsync_file(self.merged_idx)
        with IndexedDataset(self.prefix, bin_path=self.merged, idx_path=self.merged_idx) as ds:
            if len(ds) != sizes.size or ds.data_bytes != ds.bin_bytes or not ds.contiguous:
                raise RetraceError(f"internal error: {self.merged} does not match its index")
        st["final"] = True
        write_json(self.work / "state.json", st)
        return self._finish_renames()

    def _finish_renames(self) -> dict:
        """Move ``merged.bin`` then ``merged.idx`` onto the output (idempotent after a kill) and clean up."""
        st = self.state
        bin_out, idx_out = Path(f"{self.prefix}.bin"), Path(f"{self.prefix}.idx")
        if self.merged.exists():
            with contextlib.suppress(FileNotFoundError):
                idx_out.unlink()  # never leave a new .bin beside an old .idx
            os.replace(self.merged, bin_out)
        if self.merged_idx.exists():
            if not bin_out.exists() or bin_out.stat().st_size != st["merged_bytes"]:
                raise RetraceError(f"{bin_out} is missing or not the merged data of {self.work}; delete "
                                   f"{self.work} to start over")
            os.replace(self.merged_idx, idx_out)
        _fsync_dir(self.prefix.parent)
        shutil.rmtree(self.work)
        if not (bin_out.is_file() and idx_out.is_file()):  # only if someone removed them after a kill
            raise RetraceError(f"{self.prefix}: the output of an interrupted run is gone; run again")
        return {"documents": st["documents"], "tokens": st["tokens"], "shards": st["merged_shards"],
                "lines": st["lines"], "input_bytes": st["input_bytes"], "resumed": self.resumed}
