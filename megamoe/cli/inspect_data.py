#!/usr/bin/env python
"""Check a Megatron PREFIX.bin/PREFIX.idx pair (or a headerless token file) and print statistics.

  python tools/inspect_data.py out/corpus [--tokenizer tok.model] [--doc 3] [--tokens 200]
  python tools/inspect_data.py data/train.bin --dtype uint16
Exit status 1 with a message when the pair is truncated, corrupted or inconsistent.
"""
import argparse
import sys



def main(argv=None) -> int:
    from megamoe.data.indexed import IndexedDatasetError
    from megamoe.data.preprocess import format_verify, verify_dataset

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prefix", help="PREFIX of PREFIX.bin/.idx, or a headerless .bin with --dtype")
    ap.add_argument("--tokenizer", default=None, help="decode a sample and check ids < vocab size")
    ap.add_argument("--doc", type=int, default=0, help="document to decode")
    ap.add_argument("--tokens", type=int, default=200, help="tokens to decode")
    ap.add_argument("--dtype", default=None, choices=["uint16", "uint32", "int32"], help="headerless file dtype")
    args = ap.parse_args(argv)
    try:
        info = verify_dataset(args.prefix, args.tokenizer, sample_tokens=args.tokens,
                              sample_doc=args.doc, headerless_dtype=args.dtype)
    except (IndexedDatasetError, ValueError, FileNotFoundError, IndexError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_verify(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
