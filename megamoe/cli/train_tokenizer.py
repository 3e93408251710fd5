#!/usr/bin/env python
"""Train a sentencepiece BPE tokenizer (byte fallback; unk 0, bos 1, eos 2, pad 3) on the inputs
preprocess reads (txt/jsonl/json.gz/parquet/csv, globs, directories).

  python tools/train_tokenizer.py --input 'data/shakespeare/*.txt' --vocab-size 8000 --output data/tok
writes DIR/tokenizer.model (+ tokenizer.vocab); load it with megamoe.data.tokenizer.load_tokenizer.
"""
import argparse
import sys



def main(argv=None) -> int:
    from megamoe.data.text_sources import FORMATS, TXT_MODES, BadInputError, expand_inputs, iter_documents
    from megamoe.data.tokenizer import load_tokenizer, train_sentencepiece

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", required=True)
    ap.add_argument("--vocab-size", type=int, required=True)
    ap.add_argument("--output", required=True, help="output directory")
    ap.add_argument("--json-key", default="text")
    ap.add_argument("--input-format", choices=FORMATS, default=None)
    ap.add_argument("--txt-mode", choices=TXT_MODES, default="file")
    ap.add_argument("--skip-bad", action="store_true")
    ap.add_argument("--max-sentences", type=int, default=2_000_000, help="training lines kept")
    args = ap.parse_args(argv)
    try:
        files = expand_inputs(args.input)
        docs = (r.text for r in iter_documents(files, args.input_format, args.json_key, args.txt_mode,
                                                args.skip_bad) if r.error is None)
        path = train_sentencepiece(docs, args.output, args.vocab_size, max_sentences=args.max_sentences)
    except (BadInputError, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    tok = load_tokenizer(path)
    print(f"wrote {path}: vocab {tok.vocab_size}, bos {tok.bos_id}, eos {tok.eos_id}, pad {tok.pad_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
