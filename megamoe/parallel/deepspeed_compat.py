"""Every patch megamoe applies to DeepSpeed internals, in one place, for one DeepSpeed version.

Module-level names swapped while `deepspeed.initialize` runs (and restored after):
- `deepspeed.module_inject.auto_ep_layer.TokenChoiceTopKRouter`: AutoEP builds megamoe's router
  inside each expert-parallel layer (megamoe.parallel.expert);
- `...auto_ep_layer.repack_expert_weights` and `GroupedExperts`: each rank builds only its slice
  of the routed experts, on its device, from a model whose experts were left on the meta device;
  the class built is a subclass megamoe hands in (megamoe.parallel.expert: the experts' backward
  keeps what megamoe's own experts keep, not what autograd keeps);
- `deepspeed.set_optimizer_flags`: Muon goes on exactly the hidden matrices (megamoe.optim).
And two methods of the ZeRO-1/2 optimizer object (one instance, after initialize) lose host
syncs that cost a GPU stall each per step without changing a result (`sync_free_zero_step`):
- `unscale_and_clip_grads` asks `is_invalid_grad_norm(norm)` (a `.item()`) once per parameter
  group to turn an invalid norm into +inf; `torch.where` does the same on the device;
- with the norm check on (it always is when DeepSpeed computes the norm), `check_overflow` first
  scans every gradient for inf/NaN and reads the all-reduced flag back (a second `.item()`),
  though a non-finite gradient makes the norm invalid and the norm check skips the step as well.
And for the process, once AutoEP runs: on CPU tokens, AutoEP's token permutation and weighted
combine run as row gathers, as on CUDA, not advanced indexing (`autoep_gathers_on_cpu`).
`zero3_partitioner` calls ZeRO-3's parameter converter (`Init._convert_to_zero_parameters`) per
block while the model is built. All are internals with no stability promise, so each patch first
checks that the installed DeepSpeed is the one they were written and tested against.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator

SUPPORTED_DEEPSPEED = "0.19.8"


class DeepSpeedVersionError(RuntimeError):
    pass


def installed_version() -> str:
    import deepspeed
    return str(deepspeed.__version__).split("+")[0]


def check_version() -> None:
    found = installed_version()
    if found != SUPPORTED_DEEPSPEED:
        raise DeepSpeedVersionError(
            f"megamoe patches DeepSpeed internals (AutoEP's router class, Muon's parameter flags) written for "
            f"deepspeed=={SUPPORTED_DEEPSPEED}, but deepspeed {found} is installed. Install the supported one: "
            f"pip install --no-build-isolation deepspeed=={SUPPORTED_DEEPSPEED} (after torch). Porting to "
            f"{found} means re-checking megamoe/parallel/deepspeed_compat.py against its sources.")


@contextlib.contextmanager
def _swap(owner: Any, name: str, replacement: Any) -> Iterator[Any]:
    """owner.name = replacement for the duration; yields the original; restores it on any exit."""
    check_version()
    original = getattr(owner, name)
    setattr(owner, name, replacement)
    try:
        yield original
    finally:
        setattr(owner, name, original)


def autoep_router_class(factory: Callable[..., Any]):
    """While active, AutoEPMoELayer.__init__ builds its router with `factory(**router_kwargs)`."""
    import deepspeed.module_inject.auto_ep_layer as auto_ep_layer
    return _swap(auto_ep_layer, "TokenChoiceTopKRouter", factory)


@contextlib.contextmanager
def autoep_local_experts(local_weights: Callable[[Any, int, int], Any],
                         experts_class: Callable[[type], type] = lambda grouped: grouped) -> Iterator[None]:
    """While active, AutoEPMoELayer.__init__ builds its experts as `experts_class(GroupedExperts)`
    (deepspeed.moe.ep_experts's class, or a subclass made from it) and asks
    `local_weights(experts_source, start, end)` for
    this rank's expert weights (w1 gate [n, I, H], w2 down [n, H, I], w3 up [n, I, H]) before
    repacking them from the source module as DeepSpeed does; None means: repack. Where it answers,
    the layer's own GroupedExperts is allocated on the answer's device (DeepSpeed allocates it on
    the default device, the host, and the engine moves it later: a host copy of every local
    expert). So a source whose experts never got storage (left on the meta device) costs
    nothing, and each rank builds only its slice, where it will live."""
    import deepspeed.module_inject.auto_ep_layer as auto_ep_layer
    import torch
    repack, grouped = auto_ep_layer.repack_expert_weights, experts_class(auto_ep_layer.GroupedExperts)
    pending = []   # the device of the slice just built, for the GroupedExperts built next

    def local_or_repack(experts_source, spec, ep_rank, ep_size):
        n = spec.num_experts // ep_size
        weights = local_weights(experts_source, ep_rank * n, (ep_rank + 1) * n)
        if weights is None:
            return repack(experts_source, spec, ep_rank, ep_size)
        pending.append(weights[0].device)
        return weights

    def grouped_on_device(*args, **kwargs):
        with torch.device(pending.pop() if pending else "cpu"):
            return grouped(*args, **kwargs)

    with _swap(auto_ep_layer, "repack_expert_weights", local_or_repack), \
            _swap(auto_ep_layer, "GroupedExperts", grouped_on_device):
        yield


AUTOEP_STOCK: dict = {}   # (module, name) -> DeepSpeed's function, once autoep_gathers_on_cpu replaced it


def autoep_gathers_on_cpu() -> bool:
    """For the rest of the process, AutoEP moves CPU tokens by row gathers, as it does on CUDA.

    On CUDA, AutoEP reorders tokens by expert with `ep_kernels.permute_rows` (a Triton gather
    forward; gathers again in backward) and un-permutes by a gather. Elsewhere it falls back to
    advanced indexing: a zero row appended to the tokens (a copy), `tokens[idx]`, whose backward
    is an accumulating `index_put`, and a scatter into a zero-filled buffer back. Those, and the
    weighted combine (a scatter, then a [T, K, H] fp32 product), took about a fifth of the
    demo's CPU step. Here:
    - `ep_kernels.permute_rows_supported` also accepts 2-D CPU tensors, and `ep_kernels.gather_rows`
      (the Triton kernel's host) gets a torch body for them: an index_select, then zero rows at the
      padding slots. Same values and gradients as the fallback, bit for bit;
    - `auto_ep_layer.combine_from_routed` for CPU tokens with score_apply "post" and the default
      weighted_sum runs megamoe's `dispatch.Combine` (gathers both ways, the fp32 product a chunk
      of tokens at a time): DeepSpeed's weighted sum, bit for bit, and its gradients.
    CUDA tensors and other combine settings take DeepSpeed's own code. Returns whether it patched
    now (False: already patched). DeepSpeed's functions stay in `AUTOEP_STOCK` (for tests and
    benches that compare)."""
    check_version()
    import deepspeed.module_inject.auto_ep_layer as auto_ep_layer
    import deepspeed.moe.ep_kernels as ep_kernels
    if getattr(ep_kernels, "_megamoe_cpu_gathers", False):
        return False
    supported, gather, combine = (ep_kernels.permute_rows_supported, ep_kernels.gather_rows,
                                  auto_ep_layer.combine_from_routed)
    AUTOEP_STOCK.update({(ep_kernels, "permute_rows_supported"): supported, (ep_kernels, "gather_rows"): gather,
                         (auto_ep_layer, "combine_from_routed"): combine})

    def permute_rows_supported(rows):
        return supported(rows) or (rows.device.type == "cpu" and rows.dim() == 2)

    def gather_rows(src, index):
        if src.device.type != "cpu":
            return gather(src, index)
        n = src.shape[0]
        if n == 0:      # a rank that received no token: every slot is padding
            return src.new_zeros(index.numel(), src.shape[1])
        out = src.index_select(0, index.clamp(0, n - 1))
        padding = ((index < 0) | (index >= n)).nonzero().squeeze(1)   # a few rows: 5x faster than masked_fill_
        return out.index_fill_(0, padding, 0)

    def combine_from_routed(expert_output, top_scores, token_indices_sorted, top_k, score_apply, combine_impl,
                            shape):
        if expert_output.device.type != "cpu" or score_apply != "post" or combine_impl != "weighted_sum":
            return combine(expert_output, top_scores, token_indices_sorted, top_k, score_apply, combine_impl, shape)
        from megamoe.model.dispatch import Combine, inverse_permutation
        out = Combine.apply(expert_output, top_scores.reshape(-1, top_k), token_indices_sorted,
                            inverse_permutation(token_indices_sorted))
        return out.reshape(shape)

    ep_kernels.permute_rows_supported, ep_kernels.gather_rows = permute_rows_supported, gather_rows
    auto_ep_layer.combine_from_routed = combine_from_routed
    ep_kernels._megamoe_cpu_gathers = True
    return True


def zero3_partitioner(ds_config: dict):
    """(dtype ZeRO-3 keeps parameters in, partition(params)): `partition` turns freshly built
    parameters into partitioned ZeRO-3 parameters, as constructing them inside
    `deepspeed.zero.Init(config_dict_or_path=ds_config)` would. Init's own `module=` argument
    converts a whole finished module, and patches F.linear globally while doing so; this converts
    one block at a time, through the converter Init attaches to every parameter it makes (the
    engine uses the same one for AutoEP's experts), so a rank never holds more than one block."""
    import deepspeed
    check_version()
    init = deepspeed.zero.Init(config_dict_or_path=ds_config)   # never entered: no class patching
    # What Init(module=...) does too, and why it matters: torch's linear saves a transposed *view*
    # of the weight for backward, which keeps the gathered full weight alive after ZeRO-3 releases
    # the parameter, so every layer's weights would stay gathered from forward to backward.
    # DeepSpeed's replacement saves the parameter itself and gathers it again in backward. Like
    # Init's, the swap of F.linear lasts for the process; zero_optimization.memory_efficient_linear
    # = false turns it off here as there.
    if init.mem_efficient_linear:
        init._enable_mem_efficient_linear()

    def partition(params) -> None:
        init._convert_to_zero_parameters(params)

    return init.dtype, partition


@contextlib.contextmanager
def optimizer_flags_hook(after: Callable[[Any], None]) -> Iterator[None]:
    """While active, `deepspeed.set_optimizer_flags(config_class, model)` (called by initialize and
    by the engine after AutoEP builds expert parameters) runs DeepSpeed's own tagging, then
    `after(model)`."""
    import deepspeed

    def set_flags(config_class, model):
        original(config_class, model)
        after(model)

    with _swap(deepspeed, "set_optimizer_flags", set_flags) as original:
        yield


def checks_grad_overflow(engine) -> bool:
    """Whether DeepSpeed skips the optimizer step itself when a gradient is non-finite (ZeRO-1/2
    check the global norm unless bf16's check_grad_overflow is off; ZeRO-3 and DeepSpeed's bf16 and
    fp16 optimizers always do). Without it, a poisoned step would be applied."""
    stage = engine.zero_optimization_stage()
    if engine.bfloat16_enabled():
        return stage == 3 or bool(engine._config.bfloat16_config.check_grad_overflow)
    return stage > 0 or engine.fp16_enabled()


def sync_free_zero_step(engine) -> bool:
    """Patch the engine's ZeRO-1/2 optimizer as the module docstring says. Returns whether it did
    (other stages and optimizers are left as they are)."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    opt = engine.optimizer
    if not isinstance(opt, DeepSpeedZeroOptimizer):
        return False
    check_version()
    import types

    import torch

    def unscale_and_clip_grads(self, grad_groups_flat, total_norm):
        if self.clip_grad == 0.0 and self.loss_scale == 1.0:
            return
        combined_scale = self.loss_scale
        if self.clip_grad > 0.:
            clip_norm = total_norm
            if torch.is_tensor(total_norm):   # invalid (non-finite, or the -1 sentinel) -> +inf, on the device
                clip_norm = torch.where(torch.isfinite(total_norm) & (total_norm >= 0), total_norm,
                                        torch.full_like(total_norm, float("inf")))
            elif not (math.isfinite(float(total_norm)) and total_norm >= 0):
                clip_norm = float("inf")
            clip = ((clip_norm / self.loss_scale) + 1e-6) / self.clip_grad
            combined_scale = torch.clamp(torch.as_tensor(clip), min=1.0) * self.loss_scale
        for grad in grad_groups_flat:
            for g in (grad if isinstance(grad, list) else [grad]):
                g.data.mul_(1. / combined_scale)

    original_check = opt.check_overflow

    def check_overflow(self, partition_gradients=True):
        # step() checks the norm right after this whenever it computes one (compute_grad_norm), for
        # every dtype but bf16 without check_grad_overflow, where check_overflow is not called at all
        if self.compute_grad_norm and not self.cpu_offload:
            self.overflow = False
            return
        original_check(partition_gradients)

    opt.unscale_and_clip_grads = types.MethodType(unscale_and_clip_grads, opt)
    opt.check_overflow = types.MethodType(check_overflow, opt)
    return True


@contextlib.contextmanager
def autoep_syncs_as_on_gpu(note_split_plan_read: Callable[[], None],
                           paused: Callable[[], contextlib.AbstractContextManager]) -> Iterator[None]:
    """For counting AutoEP's host syncs on a CPU run as a CUDA run has them (megamoe.syncs):
    - `_split_plan_from_expert_counts` ends in `.cpu().tolist()` (the all-to-all sizes), a
      device-to-host copy on CUDA that dispatches nothing on the CPU: `note_split_plan_read()`
      is called once per plan;
    - `fill_indices_cpu` is the CPU stand-in for the Triton permutation kernel a CUDA run launches
      instead; its per-expert `.item()` reads do not exist there, so it runs inside `paused()`;
    - so does `gather_rows`, whose CPU body (autoep_gathers_on_cpu) finds the padding rows with a
      `nonzero` where CUDA runs DeepSpeed's Triton gather."""
    import deepspeed.module_inject.auto_ep_layer as auto_ep_layer
    import deepspeed.moe.ep_kernels as ep_kernels
    plan = auto_ep_layer._split_plan_from_expert_counts
    fill, gather = ep_kernels.fill_indices_cpu, ep_kernels.gather_rows

    def counted_plan(*args, **kwargs):
        note_split_plan_read()
        return plan(*args, **kwargs)

    def quiet(kernel):
        def run(*args, **kwargs):
            with paused():
                return kernel(*args, **kwargs)
        return run

    with _swap(auto_ep_layer, "_split_plan_from_expert_counts", counted_plan), \
            _swap(ep_kernels, "fill_indices_cpu", quiet(fill)), _swap(ep_kernels, "gather_rows", quiet(gather)):
        yield
