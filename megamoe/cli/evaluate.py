"""Perplexity and bits per byte of a megamoe checkpoint or HF directory on text or tokens.

    python tools/evaluate.py --model runs/x/checkpoints --data valid.txt
    python tools/evaluate.py --model hf/x --data data/shakespeare_text_document [--max-tokens 100000]

--data is a UTF-8 text file (tokenized with the model's tokenizer), a Megatron PREFIX (.bin/.idx)
or a headerless token file `train.bin:uint16`. Bits per byte = total NLL / ln 2 / UTF-8 bytes
(for token files the bytes come from decoding with the model's tokenizer).
"""
import argparse
import json
import sys

from megamoe.cli import add_device_flags, add_trust_flag



def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="megamoe SAVE_DIR (or tag dir) or an HF directory")
    ap.add_argument("--tag", default=None)
    ap.add_argument("--tokenizer", default=None, help="override the tokenizer file")
    ap.add_argument("--data", required=True, help="text file, token PREFIX, or headerless FILE.bin:uint16")
    ap.add_argument("--seq-len", type=int, default=None, help="window length (default: max_position_embeddings)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=None, help="score at most this many tokens")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    ap.add_argument("--no-progress", action="store_true")
    add_device_flags(ap)
    add_trust_flag(ap)
    args = ap.parse_args(argv)

    from megamoe.checkpoint import CheckpointError
    from megamoe.cli import report_errors
    from megamoe.hf import HFConversionError
    from megamoe.inference import evaluate_lm, load_model, resolve_device, resolve_dtype

    with report_errors("evaluate", CheckpointError, HFConversionError, FileNotFoundError, ValueError) as failed:
        device = resolve_device(args.device)
        lm = load_model(args.model, tag=args.tag, tokenizer=args.tokenizer, device=device,
                        dtype=resolve_dtype(args.dtype, device), trust=args.trust_checkpoint)
        res = evaluate_lm(lm, args.data, seq_len=args.seq_len, batch_size=args.batch_size,
                          max_tokens=args.max_tokens, progress=not args.no_progress)
    if failed:
        return failed.code
    if args.json:
        print(json.dumps(res.as_dict()))
    else:
        bpb = "n/a (no tokenizer to count bytes)" if res.bits_per_byte is None else f"{res.bits_per_byte:.4f}"
        print(f"tokens {res.tokens}  loss {res.loss:.4f}  perplexity {res.perplexity:.3f}  bits/byte {bpb}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
