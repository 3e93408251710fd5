"""Hugging Face `deepseek_v3` / `deepseek_v2` directory -> megamoe checkpoint (continued pretraining).

    python tools/convert_from_hf.py --input hf/model --output runs/x/init [--dtype float32]

Writes a weights-only checkpoint: OUTPUT/latest, OUTPUT/global_step0/model.safetensors (native
names) + megamoe_state.json ("weights_only": true, the ModelConfig, the tokenizer copied to
OUTPUT/tokenizer/). It carries no optimizer or engine state, so the trainer can start from it at
any ZeRO stage, EP size or world size (a fresh optimizer at step 0).
"""
import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True, help="transformers model directory (config.json + safetensors)")
    ap.add_argument("--output", required=True, help="new (or empty) megamoe checkpoint directory")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="stored weight dtype (float32 keeps fp32 master precision)")
    args = ap.parse_args(argv)

    from megamoe.checkpoint import CheckpointError
    from megamoe.cli import report_errors
    from megamoe.config import ConfigError
    from megamoe.export import convert_from_hf
    from megamoe.hf import HFConversionError

    with report_errors("convert_from_hf", CheckpointError, HFConversionError, ConfigError,
                       FileExistsError) as failed:
        out = convert_from_hf(args.input, args.output, dtype=args.dtype)
    if failed:
        return failed.code
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
