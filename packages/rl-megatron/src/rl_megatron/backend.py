"""`MegatronBackend`: rl-core's TrainingBackend on megatron-core (TP x PP x CP x DP, pipeline schedules,
Megatron DDP and optimizer, dist_checkpointing).

Every rank is handed the same global batch; data-parallel rank d trains on samples d::DP, which its
TP/CP/PP peers see too. Expert parallelism splits MoE layers' experts over data-parallel (x CP) ranks:
each rank's tokens travel to their experts and back inside the forward. Results (forward outputs, metrics) are complete on every rank: the last pipeline
stage computes them, sums them over data-parallel ranks and broadcasts them to the other stages.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, overload

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel.random import initialize_rng_tracker, model_parallel_cuda_manual_seed
from megatron.core.transformer.module import Float16Module

from rl_core.losses import TrainLoss
from rl_core.lr_schedule import learning_rate
from rl_core.micro_batches import MicroBatch, batch_denominators, loss_inputs, rank_micro_batches, validate_batch
from rl_core.protocols import ForwardModel
from rl_core.train_batch import TrainBatch
from rl_megatron.checkpoint import load_checkpoint, save_checkpoint
from rl_megatron.compiled import compile_layers
from rl_megatron.config import MegatronConfig
from rl_megatron.cpu_support import on_cpu
from rl_megatron.distributed import join_process_group, resolve_device
from rl_megatron.export import export_plan, gather_full
from rl_megatron.gpt_model import HFWeights, build_gpt, load_stage, padded_vocab_size, stage_state, transformer_config
from rl_megatron.hf_config import check_config, read_hf_config
from rl_megatron.layers import cp_positions
from rl_megatron.lm_head import emit_hidden_states, head_input, head_log_probs, output_weight
from rl_megatron.offload import Offloader, training_tensors
from rl_megatron.weight_mapping import megatron_tensor_to_hf


class _GatherReplicated(torch.autograd.Function):
    """All-gather along dim 1 over the CP group for a computation every CP rank then repeats identically
    (the loss): each rank's gradient is its own slice of the (identical) upstream gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.rank, ctx.size = dist.get_rank(group), dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(ctx.size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.chunk(ctx.size, dim=1)[ctx.rank], None


@dataclass
class _Fed:
    """One micro-batch as this rank feeds it: its CP share of the padded sequence and next-token targets."""

    mb: MicroBatch
    tokens: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor
    padding: torch.Tensor
    """True at padding positions (MoE routers leave them out of the load-balancing losses)."""
    head_index: torch.Tensor
    """[N] flat indices into this rank's [B, S_local] positions that predict a response token: the LM head
    runs there only."""
    ref_log_probs: torch.Tensor | None = None


@overload
def _pad_to(t: torch.Tensor, rows: int, cols: int | None = None) -> torch.Tensor: ...
@overload
def _pad_to(t: None, rows: int, cols: int | None = None) -> None: ...
def _pad_to(t: torch.Tensor | None, rows: int, cols: int | None = None) -> torch.Tensor | None:
    if t is None:
        return None
    pad_cols = 0 if cols is None else cols - t.shape[1]
    return torch.nn.functional.pad(t, (0, pad_cols, 0, rows - t.shape[0]))


def _pad_micro_batch(mb: MicroBatch, rows: int, seq_len: int) -> MicroBatch:
    """`mb` with `rows` rows (extra rows are padding with an all-zero loss mask) and sequences of `seq_len`."""
    return MicroBatch(
        sample_indices=mb.sample_indices,
        input_ids=_pad_to(mb.input_ids, rows, seq_len),
        attention_mask=_pad_to(mb.attention_mask, rows, seq_len),
        position_ids=_pad_to(mb.position_ids, rows, seq_len),
        response_positions=_pad_to(mb.response_positions, rows),
        response_tokens=_pad_to(mb.response_tokens, rows),
        response_valid=_pad_to(mb.response_valid, rows),
        loss_mask=_pad_to(mb.loss_mask, rows),
        advantages=_pad_to(mb.advantages, rows),
        rollout_log_probs=_pad_to(mb.rollout_log_probs, rows),
        old_log_probs=_pad_to(mb.old_log_probs, rows),
        returns=_pad_to(mb.returns, rows),
        values=_pad_to(mb.values, rows),
    )


def _finalize_summed_grads(model, num_tokens=None, **kwargs):
    """megatron-core's grad finalisation (DP reduction, SP/QK-norm and tied-embedding all-reduces) without
    its division by the token count: rl-core's losses are already shares of the global-batch loss."""
    return finalize_model_grads(model, None, **kwargs)


def _use_fused_adam(optimizer) -> None:
    """Switch the torch AdamW that megatron-core falls back to without Apex/TransformerEngine (foreach
    kernels on CUDA, a per-tensor loop on a CPU) to torch's fused kernel, on its float32 master weights:
    one kernel per group of tensors, the same update. Adam reads these flags from each group at step time;
    a state dict saved either way loads either way (torch moves `step` to the parameter's device)."""
    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(chained, "optimizer", None)
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            inner.defaults.update(foreach=False, fused=True)
            for group in inner.param_groups:
                group.update(foreach=False, fused=True)


class MegatronBackend:
    """A Hugging Face Llama/Qwen2/Qwen3 model trained as a megatron-core GPTModel over every rank of the
    default process group. All public methods are collectives."""

    result_rank = 0

    def __init__(self, config: MegatronConfig) -> None:
        self.config = config
        self.hf_config = read_hf_config(config.model_path)
        self.shape = check_config(config, self.hf_config)
        self.device = resolve_device(config.device)
        self._cpu = self.device.type == "cpu"
        self._compiled = config.torch_compile and not self._cpu
        """torch.compile on the decoder layers and the log-prob parts (CUDA only: a CPU runs them eager)."""
        with on_cpu(self._cpu):
            self._owns_group = join_process_group(self.device)
            check_config(config, self.hf_config, world_size=dist.get_world_size())
            parallel_state.initialize_model_parallel(
                tensor_model_parallel_size=config.tensor_model_parallel_size,
                pipeline_model_parallel_size=config.pipeline_model_parallel_size,
                context_parallel_size=config.context_parallel_size,
                expert_model_parallel_size=config.expert_model_parallel_size,
                expert_tensor_parallel_size=config.expert_tp_size,
            )
            if self._cpu:
                initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
            else:
                model_parallel_cuda_manual_seed(config.seed)
            self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
            self.pp_rank = parallel_state.get_pipeline_model_parallel_rank()
            self.cp_rank = parallel_state.get_context_parallel_rank()
            self.dp_rank = parallel_state.get_data_parallel_rank()
            self.dp_size = parallel_state.get_data_parallel_world_size()
            self.vocab_local = padded_vocab_size(self.shape, config.tensor_model_parallel_size) // config.tensor_model_parallel_size

            self.tf_config = transformer_config(config, self.shape, self.hf_config, on_cpu=self._cpu)
            if self._cpu:
                self.tf_config.batch_p2p_comm = False  # batched p2p waits on CUDA
            weights = HFWeights(config.model_path, self.hf_config, config.seed)
            state = stage_state(
                weights.take,
                self.shape,
                config.tensor_model_parallel_size,
                self.tp_rank,
                config.pipeline_model_parallel_size,
                self.pp_rank,
                lm_head=config.head == "lm",
                ep_size=config.expert_model_parallel_size,
                ep_rank=parallel_state.get_expert_model_parallel_rank(),
                etp_size=config.expert_tp_size,
                etp_rank=parallel_state.get_expert_tensor_parallel_rank(),
            )
            del weights
            self.gpt = self._build(self.tf_config, state)
            self.reference = None
            if config.ref_model:
                self.reference = self._build(copy.copy(self.tf_config), state).requires_grad_(False).eval()
            del state

            ddp_config = DistributedDataParallelConfig(
                grad_reduce_in_fp32=config.accumulate_allreduce_grads_in_fp32,
                use_distributed_optimizer=config.use_distributed_optimizer,
            )
            self.model = DistributedDataParallel(config=self.tf_config, ddp_config=ddp_config, module=self._wrap(self.gpt))
            self.tf_config.finalize_model_grads_func = _finalize_summed_grads
            self.tf_config.no_sync_func = self.model.no_sync
            self.optimizer = get_megatron_optimizer(self._optimizer_config(), [self.model])
            _use_fused_adam(self.optimizer)
            self.steps = 0
            self._offloader = Offloader()

    # --- building -------------------------------------------------------------------------------------

    def _build(self, tf_config, state):
        model = build_gpt(self.config, self.shape, self.hf_config, tf_config)
        load_stage(model, state)
        if self.config.head == "lm" and model.post_process:
            emit_hidden_states(model)
        if self._compiled and self.config.transformer_impl == "local":  # TransformerEngine's layers are fused already
            compile_layers(model)
        return model.to(self.device)

    def _wrap(self, model):
        return Float16Module(self.tf_config, model) if self.tf_config.bf16 else model

    def _optimizer_config(self) -> OptimizerConfig:
        c = self.config
        return OptimizerConfig(
            optimizer=c.optimizer,
            lr=c.lr,
            min_lr=c.min_lr,
            weight_decay=c.weight_decay,
            adam_beta1=c.adam_beta1,
            adam_beta2=c.adam_beta2,
            adam_eps=c.adam_eps,
            sgd_momentum=c.sgd_momentum,
            # clip_grad 0 disables clipping, but the norm is still reported: clip at a bound never reached.
            clip_grad=c.clip_grad if c.clip_grad > 0 else 1e30,
            bf16=self.tf_config.bf16,
            params_dtype=self.tf_config.params_dtype,
            use_distributed_optimizer=c.use_distributed_optimizer,
        )

    # --- batches ---------------------------------------------------------------------------------------

    def _feed(self, batch: TrainBatch, ref_log_probs: list[torch.Tensor] | None = None) -> tuple[list[_Fed], int, int]:
        """This DP rank's micro-batches, padded to one shape, cut to this CP rank's chunks; with the
        sequence length and rows the pipeline schedule is told."""
        validate_batch(batch, self.shape.vocab_size)
        c = self.config
        micro_batches = rank_micro_batches(batch, self.dp_rank, self.dp_size, c.micro_batch_size, self.device)
        multiple = (2 * c.context_parallel_size if c.context_parallel_size > 1 else 1) * (
            c.tensor_model_parallel_size if c.sequence_parallel else 1
        )
        longest = max(mb.input_ids.shape[1] for mb in micro_batches)
        seq_len = -(-longest // multiple) * multiple
        pipeline_rows = c.micro_batch_size if c.pipeline_model_parallel_size > 1 else None
        fed = []
        for mb in micro_batches:
            mb = _pad_micro_batch(mb, pipeline_rows or mb.input_ids.shape[0], seq_len)
            targets = torch.nn.functional.pad(mb.input_ids[:, 1:], (0, 1))
            tokens, positions, padding = mb.input_ids, mb.position_ids, mb.attention_mask == 0
            if c.context_parallel_size > 1:
                mine = cp_positions(seq_len // c.context_parallel_size, self.cp_rank, c.context_parallel_size, self.device)
                tokens, positions, targets, padding = tokens[:, mine], positions[:, mine], targets[:, mine], padding[:, mine]
            # Positions whose next token is a response token (index_put: a padded response slot points at 0 too).
            wanted = torch.zeros_like(mb.input_ids, dtype=torch.bool)
            row_of = torch.arange(wanted.shape[0], device=self.device)[:, None].expand_as(mb.response_positions)
            wanted[row_of[mb.response_valid], mb.response_positions[mb.response_valid]] = True
            if c.context_parallel_size > 1:
                wanted = wanted[:, mine]
            head_index = wanted.reshape(-1).nonzero()[:, 0]
            ref = None
            if ref_log_probs is not None:
                ref = torch.zeros_like(mb.loss_mask)
                for row, i in enumerate(mb.sample_indices):
                    ref[row, : batch.response_lengths[i]] = ref_log_probs[i].to(self.device)
            fed.append(_Fed(mb, tokens.contiguous(), positions.contiguous(), targets.contiguous(), padding.contiguous(), head_index, ref))
        return fed, seq_len, pipeline_rows or c.micro_batch_size

    def _response_outputs(self, fed: _Fed, hidden: torch.Tensor, gpt, entropy: bool, entropy_grad: bool):
        """[B, T] log-probs (and entropy) of the response tokens: the vocab-parallel head on the [B, S_local, H]
        final hidden states at the positions that predict them only."""
        rows, local, width = hidden.shape
        log_probs, ent = head_log_probs(
            head_input(gpt, hidden.reshape(rows * local, width)[fed.head_index]),
            output_weight(gpt),
            fed.targets.reshape(-1)[fed.head_index],
            chunk_size=self.config.log_probs_chunk_size,
            vocab_start=self.tp_rank * self.vocab_local,
            vocab_size=self.shape.vocab_size,
            temperature=self.config.rollout_temperature,
            with_entropy=entropy,
            entropy_grad=entropy_grad,
            compiled=self._compiled,
        )

        def to_sequence(x: torch.Tensor | None) -> torch.Tensor | None:
            if x is None:
                return None
            return x.new_zeros(rows * local).scatter(0, fed.head_index, x).view(rows, local)

        return self._sequence_to_response(fed, to_sequence(log_probs)), self._sequence_to_response(fed, to_sequence(ent))

    def _sequence_to_response(self, fed: _Fed, x: torch.Tensor | None) -> torch.Tensor | None:
        """[B, T] at the response positions from [B, S_local] over this rank's positions: under CP every
        rank holds two chunks, so they are all gathered and put back in sequence order first."""
        if x is None:
            return None
        cp = self.config.context_parallel_size
        if cp > 1:
            x = _GatherReplicated.apply(x, parallel_state.get_context_parallel_group())
            local = x.shape[1] // cp
            order = torch.cat([cp_positions(local, r, cp, x.device) for r in range(cp)])
            x = x[:, torch.argsort(order)]
        x = x.gather(1, fed.mb.response_positions)
        return torch.where(fed.mb.response_valid, x, torch.zeros_like(x))

    def _outputs(self, fed: _Fed, output: torch.Tensor, gpt, needs: frozenset[str], entropy_grad: bool) -> dict:
        """What a loss (or forward) asks of this micro-batch's output: values from a value head's [B, S, 1],
        log-probs and entropy from `gpt`'s LM head on its final hidden states."""
        if self.config.head == "value":
            return {"values": self._sequence_to_response(fed, output[..., 0].float())}
        log_probs, entropy = self._response_outputs(fed, output, gpt, "entropy" in needs, entropy_grad)
        return {"log_probs": log_probs, "entropy": entropy, "ref_log_probs": fed.ref_log_probs}

    def _run(self, model, fed: list[_Fed], seq_len: int, rows: int, loss_func: Callable, forward_only: bool) -> None:
        def step(data_iterator, net):
            item = next(data_iterator)
            extra = {"padding_mask": item.padding} if self.shape.num_experts else {}
            if self.tf_config.bf16 and model is self.model:
                # Float16Module would cast the last stage's output (the final hidden states) to float32;
                # the head runs in bfloat16 and the log-softmax casts what it reads.
                extra["fp32_output"] = False
            output = net(input_ids=item.tokens, position_ids=item.positions, attention_mask=None, **extra)
            return output, functools.partial(loss_func, item)

        get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=iter(fed),
            model=model,
            num_microbatches=len(fed),
            seq_length=seq_len,
            micro_batch_size=rows,
            forward_only=forward_only,
        )

    def _last_stage_to_all(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a last-stage tensor over data-parallel ranks, then give it to every pipeline stage."""
        if parallel_state.is_pipeline_last_stage() and self.dp_size > 1:
            dist.all_reduce(tensor, group=parallel_state.get_data_parallel_group())
        if self.config.pipeline_model_parallel_size > 1:
            dist.broadcast(
                tensor,
                src=parallel_state.get_pipeline_model_parallel_last_rank(),
                group=parallel_state.get_pipeline_model_parallel_group(),
            )
        return tensor

    # --- the Protocol -------------------------------------------------------------------------------------

    def forward(self, batch: TrainBatch, model: ForwardModel = "policy") -> list[torch.Tensor]:
        net = self.reference if model == "reference" else self.model
        gpt = self.reference if model == "reference" else self.gpt
        if net is None:
            raise ValueError("forward(model='reference') needs the reference model: set MegatronConfig.ref_model=True")
        self._check_onloaded()
        with on_cpu(self._cpu), torch.no_grad():
            fed, seq_len, rows = self._feed(batch)
            offsets = [0]
            for length in batch.response_lengths:
                offsets.append(offsets[-1] + length)
            flat = torch.zeros(offsets[-1], dtype=torch.float32, device=self.device)

            what = "values" if self.config.head == "value" else "log_probs"

            def collect(item: _Fed, output: torch.Tensor):
                result = self._outputs(item, output, gpt, frozenset({what}), entropy_grad=False)[what]
                for row, i in enumerate(item.mb.sample_indices):
                    flat[offsets[i] : offsets[i + 1]] = result[row, : batch.response_lengths[i]]
                return output.new_zeros(()), torch.ones((), dtype=torch.int), {}

            net.eval()
            self._run(net, fed, seq_len, rows, collect, forward_only=True)
            flat = self._last_stage_to_all(flat).cpu()
        return [flat[offsets[i] : offsets[i + 1]].clone() for i in range(len(batch))]

    def train_step(self, batch: TrainBatch, loss: TrainLoss) -> dict[str, float]:
        if self.config.head == "value" and not loss.needs <= {"values"}:
            raise ValueError(f"a value-head backend cannot compute {sorted(loss.needs - {'values'})}")
        if self.config.head == "lm" and "values" in loss.needs:
            raise ValueError("an LM-head backend has no values; build the critic with head='value'")
        self._check_onloaded()
        with on_cpu(self._cpu):
            ref = self.forward(batch, "reference") if "ref_log_probs" in loss.needs else None
            fed, seq_len, rows = self._feed(batch, ref)
            denominators = batch_denominators(batch)
            sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.device))

            def loss_func(item: _Fed, output: torch.Tensor):
                outputs = self._outputs(item, output, self.gpt, loss.needs, loss.entropy_grad)
                value, metrics = loss(loss_inputs(item.mb, denominators, **outputs))
                for key, metric in metrics.items():
                    sums[key] += metric.detach().float()
                return value, torch.ones((), dtype=torch.int), {}

            self.model.train()
            self.model.zero_grad_buffer()
            self.optimizer.zero_grad()
            with self._router_losses_per_token(sum(len(t) for t in batch.tokens)):
                self._run(self.model, fed, seq_len, rows, loss_func, forward_only=False)
            self.steps += 1
            c = self.config
            rate = learning_rate(
                self.steps,
                lr=c.lr,
                min_lr=c.min_lr,
                decay_style=c.lr_decay_style,
                decay_iters=c.lr_decay_iters,
                warmup_iters=c.lr_warmup_iters,
            )
            for group in self.optimizer.param_groups:
                group["lr"] = rate
            _, grad_norm, _ = self.optimizer.step()
            metrics = self._metrics_to_all(sums)
        return {**metrics, "grad_norm": float(grad_norm), "lr": rate}

    @contextlib.contextmanager
    def _router_losses_per_token(self, batch_tokens: int) -> Iterator[None]:
        """MoE routers weight each micro-batch's load-balancing (and z-) loss by its token count, expecting
        megatron-core's division of all gradients by the global token count, which this backend leaves out
        (rl-core's losses are already shares of the global batch); dividing the coefficients instead makes
        each micro-batch count by its share of the batch's tokens."""
        c, tf = self.config, self.tf_config
        if not self.shape.num_experts:
            yield
            return
        tf.moe_aux_loss_coeff = c.moe_aux_loss_coeff / batch_tokens
        tf.moe_z_loss_coeff = None if c.moe_z_loss_coeff is None else c.moe_z_loss_coeff / batch_tokens
        try:
            yield
        finally:
            tf.moe_aux_loss_coeff, tf.moe_z_loss_coeff = c.moe_aux_loss_coeff, c.moe_z_loss_coeff

    def _metrics_to_all(self, sums: dict[str, torch.Tensor]) -> dict[str, float]:
        names = [sorted(sums)]
        if self.config.pipeline_model_parallel_size > 1:
            dist.broadcast_object_list(
                names,
                src=parallel_state.get_pipeline_model_parallel_last_rank(),
                group=parallel_state.get_pipeline_model_parallel_group(),
            )
        totals = torch.stack([sums[n] for n in names[0]]) if names[0] else torch.zeros(0, device=self.device)
        totals = self._last_stage_to_all(totals)
        return {name: float(v) for name, v in zip(names[0], totals.tolist())}

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """HF-named full tensors one at a time: TP shards all-gathered on the owning stage, then broadcast
        over the pipeline so every rank yields the same sequence."""
        self._check_onloaded()
        c = self.config
        for item in export_plan(self.shape, c.pipeline_model_parallel_size, c.head == "value", c.expert_model_parallel_size):
            with on_cpu(self._cpu):
                full = gather_full(self.gpt, item, self.pp_rank, self.device)
            for hf_name, tensor in megatron_tensor_to_hf(item.name, full, self.shape):
                yield hf_name, tensor

    def save(self, directory: str | Path, with_optimizer: bool = True) -> None:
        """dist_checkpointing (torch_dist) into `directory`; model only with `with_optimizer=False`."""
        self._check_onloaded()
        with on_cpu(self._cpu):
            save_checkpoint(self, Path(directory), with_optimizer=with_optimizer)

    def load(self, directory: str | Path) -> None:
        with on_cpu(self._cpu):
            load_checkpoint(self, Path(directory))

    def offload(self) -> None:
        """Parameters, gradient buffers, master weights and optimizer state (and the reference model) to
        host memory; the device storages are emptied in place."""
        self._offloader.offload(training_tensors(self.model, self.optimizer, self.reference))

    def onload(self) -> None:
        self._offloader.onload()

    def _check_onloaded(self) -> None:
        if self._offloader.offloaded:
            raise RuntimeError("MegatronBackend is offloaded: call onload() before forward, train_step, weights or save")

    def close(self) -> None:
        del self.model, self.gpt, self.reference, self.optimizer
        parallel_state.destroy_model_parallel()
        if self._owns_group and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
            self._owns_group = False

