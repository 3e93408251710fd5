"""Sample text from a megamoe checkpoint or a Hugging Face deepseek directory (latent KV cache).

    python tools/generate.py --model runs/x/checkpoints --prompt "To be, or not" \\
        [--max-new-tokens 100] [--temperature 0.8] [--top-k 50] [--top-p 0.95] [--seed 0] [--stream]
    python tools/generate.py --model hf/x --interactive

--temperature 0 is greedy decoding. --stream prints tokens as they are generated;
--interactive reads prompts in a loop (empty line or Ctrl-D quits).
"""
import argparse
import sys

from megamoe.cli import add_device_flags, add_trust_flag



def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="megamoe SAVE_DIR (or tag dir) or an HF directory")
    ap.add_argument("--tag", default=None, help="checkpoint tag (default: latest)")
    ap.add_argument("--tokenizer", default=None, help="override the tokenizer file")
    ap.add_argument("--prompt", default=None)
    ap.add_argument("--interactive", action="store_true", help="prompt loop")
    ap.add_argument("--max-new-tokens", type=int, default=100)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    add_device_flags(ap)
    add_trust_flag(ap)
    args = ap.parse_args(argv)
    if args.prompt is None and not args.interactive:
        ap.error("give --prompt TEXT or --interactive")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        ap.error("--top-p must be in (0, 1]")
    if not args.temperature >= 0:
        ap.error("--temperature must be >= 0 (0: greedy)")
    if args.top_k is not None and args.top_k < 1:
        ap.error("--top-k must be >= 1")
    if args.max_new_tokens < 0:
        ap.error("--max-new-tokens must be >= 0")

    from megamoe.checkpoint import CheckpointError
    from megamoe.cli import report_errors
    from megamoe.hf import HFConversionError
    from megamoe.inference import generate_text, load_model, resolve_device, resolve_dtype

    with report_errors("generate", CheckpointError, HFConversionError, FileNotFoundError, ValueError) as failed:
        device = resolve_device(args.device)
        lm = load_model(args.model, tag=args.tag, tokenizer=args.tokenizer, device=device,
                        dtype=resolve_dtype(args.dtype, device), trust=args.trust_checkpoint)
    if failed:
        return failed.code
    if lm.tokenizer is None:
        print(f"generate: error: {args.model} has no tokenizer; pass --tokenizer PATH", file=sys.stderr)
        return 1

    def run(prompt: str) -> None:
        kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p, seed=args.seed)
        if args.stream or args.interactive:
            sys.stdout.write(prompt)
            sys.stdout.flush()
            generate_text(lm, prompt, on_text=lambda s: (sys.stdout.write(s), sys.stdout.flush()), **kw)
            sys.stdout.write("\n")
        else:
            print(prompt + generate_text(lm, prompt, **kw))
        sys.stdout.flush()

    with report_errors("generate", ValueError) as failed:   # e.g. a prompt longer than the model's context
        if args.prompt is not None:
            run(args.prompt)
        while args.interactive:
            try:
                prompt = input("> ")
            except EOFError:
                break
            if not prompt:
                break
            run(prompt)
    return failed.code if failed else 0


if __name__ == "__main__":
    sys.exit(main())
