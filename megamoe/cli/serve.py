"""A web page to talk to a trained model and watch its experts at work (Gradio, local only).

    python tools/serve.py --model runs/demo/checkpoints [--port 7860] [--host 127.0.0.1] [--device auto]

--model is a megamoe SAVE_DIR (or tag dir; any ZeRO stage / EP layout) or a Hugging Face directory.
The page streams a continuation of a prompt (temperature, top-k, top-p, max new tokens, seed,
stop), shows which experts every token went to in every MoE layer, the load per layer, and a
model card. bf16 on a GPU, fp32 on the CPU (--dtype to override).
"""
import argparse
import importlib.util
import sys

from megamoe.cli import add_device_flags, add_trust_flag


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="megamoe SAVE_DIR (or tag dir) or an HF directory")
    ap.add_argument("--tag", default=None, help="checkpoint tag (default: latest)")
    ap.add_argument("--tokenizer", default=None, help="override the tokenizer file")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    ap.add_argument("--port", type=int, default=7860)
    add_device_flags(ap)
    add_trust_flag(ap)
    args = ap.parse_args(argv)
    if not 0 < args.port < 65536:
        ap.error(f"--port {args.port}: use 1-65535")

    from megamoe.checkpoint import CheckpointError
    from megamoe.cli import report_errors
    from megamoe.hf import HFConversionError
    from megamoe.inference import load_model, resolve_device, resolve_dtype
    from megamoe.serve import render
    from megamoe.serve.session import Playground

    with report_errors("serve", CheckpointError, HFConversionError, FileNotFoundError, ValueError) as failed:
        if importlib.util.find_spec("gradio") is None:
            raise ValueError("the playground needs Gradio: pip install -e '.[serve]'")
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        lm = load_model(args.model, tag=args.tag, tokenizer=args.tokenizer, device=device, dtype=dtype,
                        trust=args.trust_checkpoint)
        pg = Playground(lm)      # PlaygroundError (a ValueError): no tokenizer
    if failed:
        return failed.code
    from megamoe.serve.app import build_app, launch
    card = render.model_card_md(lm.config, lm.source, lm.tokenizer, lm.state, str(device),
                                str(dtype).replace("torch.", ""))
    print(f"serve: {lm.source} on {device} ({dtype}); open http://{args.host}:{args.port}", flush=True)
    launch(build_app(pg, card), args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
