"""``retrace tokenize``: a jsonl / jsonl.zst corpus -> a GPT-NeoX indexed dataset (v1.0 ``--append-eod``)."""

from __future__ import annotations

import argparse

from retrace.data.tokenize import DEFAULT_SHARD_BYTES, TEXT_KEY


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tokenize",
        help="tokenize jsonl/jsonl.zst files into a GPT-NeoX .bin/.idx (one item per document + EOD)",
        description=(
            "Tokenize the INPUT files, in order, with the model's tokenizer.json exactly as GPT-NeoX v1.0's "
            "tools/preprocess_data.py --append-eod does: each line's \"text\" encoded by Hugging Face "
            "tokenizers (special tokens on), <|endoftext|> appended, one item per document, empty texts "
            "dropped, uint16 tokens when the vocabulary is < 65500. Writes PREFIX.bin then PREFIX.idx, "
            "atomically. Work is split into shards of --shard-bytes kept in PREFIX.tokenize-work, so a "
            "killed run resumes where it stopped when run again with the same inputs and options; the output "
            "does not depend on --workers. A bad line is an error naming file and line, and leaves nothing."
        ),
    )
    p.add_argument("--input", required=True, nargs="+", metavar="INPUT",
                   help=".jsonl or .jsonl.zst files (read in the order given)")
    p.add_argument("--tokenizer", required=True, metavar="JSON", help="the model's tokenizer.json")
    p.add_argument("--output", required=True, metavar="PREFIX", help="output prefix (PREFIX.bin, PREFIX.idx)")
    p.add_argument("--workers", type=int, default=1, help="tokenizing processes (default: 1)")
    p.add_argument("--shard-bytes", type=int, default=DEFAULT_SHARD_BYTES,
                   help=f"uncompressed input bytes per shard (default: {DEFAULT_SHARD_BYTES})")
    p.add_argument("--key", default=TEXT_KEY, help=f"the JSON key holding the text (default: {TEXT_KEY})")
    p.add_argument("--progress-seconds", type=float, default=30.0,
                   help="seconds between progress lines on stderr (default: 30)")
    p.add_argument("--summary", default=None, metavar="JSON",
                   help="write counts, throughput and the tokenizer's sha256 here, last")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from retrace.data.tokenize import tokenize_corpus
    from retrace.io import write_json

    result = tokenize_corpus(inputs=args.input, tokenizer=args.tokenizer, output=args.output,
                             workers=args.workers, shard_bytes=args.shard_bytes, key=args.key,
                             progress_seconds=args.progress_seconds)
    if args.summary:
        write_json(args.summary, result.to_json())
    rate = f"{result.documents / result.seconds:,.0f} docs/s" if result.seconds else ""
    print(f"{result.prefix}.bin/.idx: {result.documents:,} documents, {result.tokens:,} tokens "
          f"({result.tokenizer.dtype}, EOD {result.tokenizer.eod_id}); {result.seconds:.1f}s, {rate}"
          + (f"; {result.resumed_shards} of {result.shards} shards reused" if result.resumed_shards else ""))
    return 0
