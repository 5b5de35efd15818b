"""``retrace synth``: write the small synthetic corpus as the four Pile variants."""

from __future__ import annotations

import argparse

from retrace.data.synthetic import SynthConfig

_D = SynthConfig()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="write a small synthetic corpus as standard/deduped x raw/preshuffled",
        description=(
            "Generate documents from two random sparse Markov chains (EOD id 0 ends each one) and write "
            "DIR/{standard,deduped}/{raw,preshuffled}/document.{bin,idx} plus DIR/manifest.json (written last). "
            "standard repeats the planted documents --dup-copies times; deduped keeps each once. The "
            "preshuffled streams apply GPT-NeoX's index maps (seed --index-seed, --epochs epochs) to the raw "
            "variants. Deterministic from --seed."
        ),
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--seed", type=int, default=_D.seed, help=f"corpus seed (default: {_D.seed})")
    p.add_argument("--tokens", type=int, default=_D.tokens,
                   help=f"approximate tokens of the standard variant (default: {_D.tokens})")
    p.add_argument("--vocab", type=int, default=_D.vocab_size, help=f"vocabulary size (default: {_D.vocab_size})")
    p.add_argument("--seq-length", type=int, default=_D.seq_length,
                   help=f"sequence length of the preshuffled items (default: {_D.seq_length})")
    p.add_argument("--epochs", type=int, default=_D.epochs,
                   help=f"epochs of the index maps behind the preshuffled streams (default: {_D.epochs})")
    p.add_argument("--index-seed", type=int, default=_D.index_seed,
                   help=f"seed of the index maps (default: {_D.index_seed})")
    p.add_argument("--dup-copies", type=int, default=_D.dup_copies,
                   help=f"occurrences of each planted document in standard (default: {_D.dup_copies})")
    p.add_argument("--planted-share", type=float, default=_D.planted_share,
                   help=f"share of standard's tokens that are planted documents (default: {_D.planted_share})")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from retrace.data.synthetic import write_synthetic

    cfg = SynthConfig(seed=args.seed, tokens=args.tokens, vocab_size=args.vocab, seq_length=args.seq_length,
                      epochs=args.epochs, index_seed=args.index_seed, dup_copies=args.dup_copies,
                      planted_share=args.planted_share)
    write_synthetic(args.out, cfg, log=lambda m: print(m, file=sys.stderr))
    print(f"{args.out}/manifest.json")
    return 0
