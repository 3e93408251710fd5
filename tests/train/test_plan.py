"""The memory planner (megamoe/plan.py, tools/plan.py): its activation counts are what autograd
saves, its totals are within 15% of the peaks of real training steps on 2 CPU ranks, and its
arithmetic follows ZeRO and expert parallelism."""
import dataclasses
import json
import subprocess
import sys

import pytest
import torch

import multirank

from megamoe import plan as P
from megamoe.config import ModelConfig
from megamoe.train_config import load_ds_config

ROOT = multirank.ROOT
RANK_SCRIPT = ROOT / "tests" / "train" / "plan_rank.py"


def saved_by_autograd(cfg: ModelConfig, batch: int, seq: int, dtype=torch.float32) -> int:
    """Bytes of the distinct non-parameter storages autograd keeps for backward in one forward."""
    model = cfg.build(seed=0).to(dtype)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, labels=ids)
    return sum(seen.values())


@pytest.mark.parametrize("name,overrides", [
    ("tiny", {}), ("small-moe", {"num_hidden_layers": 3}), ("small-dense", {"num_hidden_layers": 2}),
    ("tiny", {"num_nextn_predict_layers": 1}), ("tiny", {"q_lora_rank": None}),
    ("tiny", {"num_experts_per_tok": 4, "n_shared_experts": 0}),
])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_activation_count_is_what_autograd_saves(name, overrides, dtype):
    """fp32 and bf16 as a CPU runs them by default (MEGAMOE_KERNELS=auto): the PyTorch reference
    kernels (its RMSNorm keeps fp32 copies in bf16) and, in bf16, the experts' padded rows."""
    assert_planned_is_saved(ModelConfig.load(name, **overrides), dtype, "auto")


def test_activation_count_follows_the_planned_backend_not_this_process(monkeypatch):
    """The planner describes the target: its Setup.kernels decides both the norms and the CPU
    experts' row padding, whatever MEGAMOE_KERNELS this process has. With the reference backend
    the experts are not padded, and the plan still matches what autograd saves."""
    cfg = ModelConfig.load("small-moe", num_hidden_layers=3)
    setup = P.Setup(gpus=1, micro_batch=2, seq_length=48, device="cpu")
    monkeypatch.setenv("MEGAMOE_KERNELS", "reference")
    assert P._cpu_expert_padding(cfg, setup) > 0                     # auto pads on CPUs in bf16
    assert P._cpu_expert_padding(cfg, dataclasses.replace(setup, kernels="reference")) == 0
    assert_planned_is_saved(cfg, "bf16", "reference")


@pytest.mark.parametrize("name,overrides", [
    ("tiny", {}), ("tiny", {"num_nextn_predict_layers": 1}),
    ("small-moe", {"num_hidden_layers": 3, "num_experts_per_tok": 8}),   # the router kernel's top-k <= 8
])
def test_activation_count_with_the_gpu_kernels_is_what_autograd_saves(name, overrides, monkeypatch):
    """bf16 through the Triton kernels the GPU runs (interpreted on the CPU: tests/conftest.py):
    what the planner's GPU plans count for the norms (input and rstd kept, no fp32 copies) and
    the router (no fp32 copy of its input either)."""
    monkeypatch.setenv("MEGAMOE_KERNELS", "triton")
    assert_planned_is_saved(ModelConfig.load(name, **overrides), "bf16", "triton")


def assert_planned_is_saved(cfg: ModelConfig, dtype: str, kernels: str) -> None:
    batch, seq = 2, 48
    setup = P.Setup(gpus=1, micro_batch=batch, seq_length=seq, dtype=dtype, grad_dtype=dtype, device="cpu",
                    kernels=kernels)
    saved, _ = P._activation_bytes(cfg, setup)
    loss_saved, _ = P._loss_bytes(cfg, setup)
    got = saved_by_autograd(cfg, batch, seq, {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    assert abs((saved + loss_saved) / got - 1) < 0.05, f"planned {saved + loss_saved}, autograd saved {got}"


def _ds(stage: int) -> dict:
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.95], "eps": 1e-8,
                                                      "weight_decay": 0.1, "torch_adam": True}},
            "zero_optimization": {"stage": stage, "overlap_comm": False, "contiguous_gradients": True,
                                  "reduce_bucket_size": 5e6, "allgather_bucket_size": 5e6},
            "steps_per_print": 10 ** 9}


MEASURED = [  # model, ZeRO stage, EP, micro batch, recompute
    ("small-moe", 2, 1, 4, False), ("small-moe", 1, 2, 4, False), ("small-moe", 3, 2, 4, False),
    ("small-moe", 2, 2, 4, True), ("small-dense", 3, 1, 8, False),
]


@pytest.mark.slow
@pytest.mark.parametrize("model,stage,ep,micro,recompute", MEASURED)
def test_plan_is_within_15_percent_of_the_measured_peak(model, stage, ep, micro, recompute, tmp_path):
    """fp32 training steps on 2 CPU ranks (plan_rank.py: peak resident memory above the imports,
    after the first step, malloc returning freed memory); the planner at device=cpu."""
    seq, ds = 256, _ds(stage)
    spec = dict(model=model, ds_config=ds, ep=ep, micro=micro, seq=seq, recompute=recompute, steps=3)
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    rc, out = multirank.run([RANK_SCRIPT, tmp_path / "spec.json", tmp_path / "out.json"], 2, timeout=300,
                            env={"MALLOC_MMAP_THRESHOLD_": "65536"})
    assert rc == 0, out[-4000:]
    measured = json.loads((tmp_path / "out.json").read_text())["peak_bytes"]
    setup = P.Setup.from_ds_config(ds, gpus=2, ep=ep, micro_batch=micro, seq_length=seq, recompute=recompute,
                                   device="cpu", reserve=0.0)
    planned = P.plan(ModelConfig.load(model), setup)
    assert abs(planned.total / measured - 1) <= 0.15, (
        f"planned {planned.total / 2 ** 20:.1f} MiB, measured {measured / 2 ** 20:.1f} MiB: "
        + ", ".join(f"{k} {v / 2 ** 20:.1f}" for k, v in planned.parts.items()))


# ---------------------------------------------------------------------------------------------
# arithmetic
# ---------------------------------------------------------------------------------------------
V2 = ModelConfig.load("deepseek-v2-lite")


def _plan(**kw) -> P.Plan:
    return P.plan(V2, P.Setup(**{"gpus": 8, "ep": 8, "micro_batch": 1, "seq_length": 4096, **kw}))


def test_each_zero_stage_shards_more_and_ep_splits_the_experts():
    states = {z: _plan(zero_stage=z).parts for z in (0, 1, 2, 3)}
    assert states[0]["optimizer states"] > states[1]["optimizer states"] == states[2]["optimizer states"]
    assert states[1]["gradients"] > states[2]["gradients"]
    assert states[2]["weights"] > states[3]["weights"]
    p8, p1 = _plan().params, P.Params.of(V2, 1)
    assert p8.dense + p8.experts == p1.dense == V2.num_params()["total"]
    # EP 8: each GPU holds an eighth of the routed experts' weights
    w1, w8 = _plan(ep=1).parts["weights"], _plan(ep=8).parts["weights"]
    assert w1 - w8 == pytest.approx(p8.experts * 7 / 8 * 2)
    assert _plan(offload_optimizer=True).parts["optimizer states"] == 0
    assert _plan(optimizer="muon").parts["optimizer states"] < _plan().parts["optimizer states"]
    assert _plan(recompute=True).parts["activations"] < _plan().parts["activations"] / 10


def test_largest_micro_batch_is_the_boundary():
    setup = P.Setup(gpus=8, ep=8, seq_length=4096, recompute=True)
    mb = P.largest_micro_batch(V2, setup)
    assert mb >= 2
    assert P.plan(V2, dataclasses.replace(setup, micro_batch=mb)).fits
    assert not P.plan(V2, dataclasses.replace(setup, micro_batch=mb + 1)).fits


def test_reads_the_shipped_deepspeed_configs():
    read = {n: P.Setup.from_ds_config(load_ds_config(str(ROOT / "ds_configs" / f"{n}.json")))
            for n in ("zero1", "zero2", "zero3", "zero2_offload", "muon")}
    assert [read[n].zero_stage for n in ("zero1", "zero2", "zero3")] == [1, 2, 3]
    assert read["zero2_offload"].offload_optimizer and read["muon"].optimizer == "muon"
    assert all(s.dtype == "bf16" for s in read.values())


def _cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "plan.py"), *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def _activations_gib(out: str) -> float:
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("activations"))
    return float(line.split()[1])


def test_cli_prints_the_breakdown_and_says_whether_it_fits():
    fits = _cli("--model-config", "deepseek-v2-lite", "--deepspeed-config", "ds_configs/zero2.json",
                "--gpus", "8", "--ep", "8", "--micro-batch", "1")
    assert fits.returncode == 0 and "fits in 72.0 GiB" in fits.stdout and "optimizer states" in fits.stdout
    assert "largest micro batch that fits" in fits.stdout and "tokens/s per GPU" in fits.stdout
    too_big = _cli("--model-config", "deepseek-v3", "--deepspeed-config", "ds_configs/zero2.json", "--ep", "8")
    assert too_big.returncode == 3 and "does NOT fit" in too_big.stdout
    bad = _cli("--model-config", "deepseek-v2-lite", "--deepspeed-config", "ds_configs/zero2.json", "--ep", "3")
    assert bad.returncode == 1 and "plan: error: --ep 3 must divide --gpus 8" in bad.stderr
    bad = _cli("--model-config", "deepseek-v2-lite", "--deepspeed-config", "ds_configs/zero2.json",
               "--gpus", "3", "--ep", "3")
    assert bad.returncode == 1 and "does not divide n_routed_experts=64" in bad.stderr, bad.stderr
    # --kernels is the run's MEGAMOE_KERNELS: the PyTorch norms keep fp32 copies the Triton ones do not
    ref = _cli("--model-config", "deepseek-v2-lite", "--deepspeed-config", "ds_configs/zero2.json",
               "--gpus", "8", "--ep", "8", "--micro-batch", "1", "--kernels", "reference")
    assert ref.returncode == 0 and _activations_gib(ref.stdout) > _activations_gib(fits.stdout), ref.stdout
    missing = _cli("--model-config", "deepseek-v2-lite", "--deepspeed-config", "nope.json")
    assert missing.returncode == 1 and "nope.json: file not found" in missing.stderr
