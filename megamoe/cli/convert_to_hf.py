"""megamoe checkpoint -> Hugging Face transformers `deepseek_v3` (or `deepseek_v2`) directory.

    python tools/convert_to_hf.py --checkpoint runs/x/checkpoints [--tag global_step1000] \\
        --output hf/x [--dtype bfloat16] [--max-shard-size 5GB] [--tokenizer PATH | --no-tokenizer] [--drop-mtp]

Works for checkpoints saved under any ZeRO stage and EP size (see megamoe/export.py); weights
come from the fp32 master copies. The output loads with
`AutoModelForCausalLM.from_pretrained(out, local_files_only=True)` and `AutoTokenizer`.
Nothing is written at --output unless the whole export succeeds.
"""
import argparse
import sys

from megamoe.cli import add_trust_flag


def parse_size(s: str) -> int:
    units = {"KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4, "B": 1}
    s = s.strip().upper()
    for u, m in units.items():
        if s.endswith(u):
            return int(float(s[: -len(u)]) * m)
    return int(s)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="SAVE_DIR of a megamoe run (or a global_stepN directory)")
    ap.add_argument("--tag", default=None, help="checkpoint tag (default: the one in SAVE_DIR/latest)")
    ap.add_argument("--output", required=True, help="new (or empty) output directory")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="weight dtype of the export (the routing bias stays float32)")
    ap.add_argument("--max-shard-size", default="5GB", help="safetensors shard size, e.g. 5GB, 500MB")
    ap.add_argument("--drop-mtp", action="store_true",
                    help="leave out the multi-token-prediction modules (required for models trained with "
                         "num_nextn_predict_layers > 0: transformers cannot hold them; the main model's logits "
                         "do not depend on them)")
    tok = ap.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", default="auto", help="tokenizer file (default: the checkpoint's)")
    tok.add_argument("--no-tokenizer", action="store_true", help="export without a tokenizer")
    add_trust_flag(ap)
    args = ap.parse_args(argv)

    from megamoe.checkpoint import CheckpointError
    from megamoe.cli import report_errors
    from megamoe.export import convert_to_hf
    from megamoe.hf import HFConversionError
    from megamoe.tokenizer_export import TokenizerExportError

    with report_errors("convert_to_hf", CheckpointError, HFConversionError, TokenizerExportError,
                       FileExistsError) as failed:
        out = convert_to_hf(args.checkpoint, args.output, tag=args.tag, dtype=args.dtype,
                            max_shard_bytes=parse_size(args.max_shard_size),
                            tokenizer=None if args.no_tokenizer else args.tokenizer, drop_mtp=args.drop_mtp,
                            trust=args.trust_checkpoint)
    if failed:
        return failed.code
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
