#!/usr/bin/env python
"""Tokenize text into a Megatron PREFIX.bin/PREFIX.idx pair (logic: megamoe/data/preprocess.py).

  python tools/preprocess.py --input 'data/*.jsonl.gz' --tokenizer tok.model --output-prefix out/corpus \
      --workers 4 --append-eod [--split 0.99,0.01] [--skip-bad]
  python tools/preprocess.py --verify out/corpus [--tokenizer tok.model]
"""
import argparse
import sys

from megamoe.cli import report_errors


def main(argv=None) -> int:
    from megamoe.data.indexed import IndexedDatasetError
    from megamoe.data.preprocess import format_verify, preprocess, verify_dataset
    from megamoe.data.text_sources import FORMATS, TXT_MODES, BadInputError

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", help="files, globs or directories (.txt .jsonl .json(.gz) .parquet .csv)")
    ap.add_argument("--tokenizer", help="sentencepiece .model, HF tokenizer.json or tiktoken rank file")
    ap.add_argument("--output-prefix", help="writes PREFIX.bin + PREFIX.idx (PREFIX_train/_valid with --split)")
    ap.add_argument("--json-key", default="text", help="JSON key / parquet or CSV column holding the text")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--append-eod", action="store_true", help="append the tokenizer's eos id to every document")
    ap.add_argument("--split", default=None, help="e.g. 0.99,0.01: write PREFIX_train and PREFIX_valid")
    ap.add_argument("--input-format", choices=FORMATS, default=None, help="override the extension")
    ap.add_argument("--txt-mode", choices=TXT_MODES, default="file",
                    help="txt: one document per file (default), per blank-line-separated block, or per line")
    ap.add_argument("--skip-bad", action="store_true", help="skip and count bad records instead of stopping")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--verify", metavar="PREFIX", help="check a .bin/.idx pair and print statistics")
    args = ap.parse_args(argv)

    if not args.verify and not (args.input and args.tokenizer and args.output_prefix):
        ap.error("--input, --tokenizer and --output-prefix are required (or use --verify PREFIX)")
    # OSError: unreadable inputs, a full disk, an output directory that cannot be created
    with report_errors("preprocess", BadInputError, IndexedDatasetError, ValueError, OSError) as failed:
        if args.verify:
            print(format_verify(verify_dataset(args.verify, args.tokenizer)))
            return 0
        split = [float(x) for x in args.split.split(",")] if args.split else None
        stats = preprocess(args.input, args.tokenizer, args.output_prefix, json_key=args.json_key,
                           workers=args.workers, append_eod=args.append_eod, split=split,
                           input_format=args.input_format, txt_mode=args.txt_mode,
                           skip_bad=args.skip_bad, progress=not args.no_progress)
        print(stats.summary())
        return 0
    return failed.code


if __name__ == "__main__":
    sys.exit(main())
