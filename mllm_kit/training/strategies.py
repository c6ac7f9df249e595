"""Distributed strategies named by ``trainer.strategy`` (docs/scaling.md).

``ddp`` and its variants are Lightning's own. Two sharded families are built here:

* ``fsdp`` — FSDP2 (``torch.distributed.fsdp.fully_shard``) on Lightning's ``ModelParallelStrategy`` with a 1-D
  data-parallel mesh: every transformer block of the encoder (each mixture member's too) and of the LLM is one shard
  unit (the classes the parts declare as ``layer_cls``), everything else (connector, embeddings, head) the root unit.
  Under ``bf16-*`` precision parameters compute in bf16 and gradients reduce in fp32.
* ``deepspeed_stage_1/2/3`` — Lightning's ``DeepSpeedStrategy`` (ZeRO), which also runs on CPU over gloo here (tests):
  DeepSpeed itself supports a CPU accelerator, only Lightning's CUDA checks are skipped.

Both write sharded checkpoints (each rank its own files, no full gather) into ``last.ckpt/``, atomically: the new
directory is written beside the old one and swapped in only when every rank has finished. :func:`consolidate`
puts the full weights back into the model on rank 0 for ``final/``. There is no expert parallelism: MoE experts and LoRA-MoE adapters
shard like any other parameter.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, ModelParallelStrategy, Strategy
from torch import nn

from mllm_kit.config.recipe import TrainerSpec
from mllm_kit.connectors.base import Connector
from mllm_kit.encoders.base import VisionEncoder
from mllm_kit.errors import ConfigError
from mllm_kit.files import replace_dir


def build_strategy(trainer: TrainerSpec, world: int) -> str | Strategy:
    """The Lightning strategy for ``trainer`` on ``world`` processes (a name Lightning resolves itself, or an object)."""
    if trainer.strategy == "fsdp":
        return FSDP2Strategy(world, mixed_precision=trainer.precision.startswith("bf16"), offload_parameters=trainer.offload_parameters)
    if trainer.strategy.startswith("deepspeed"):
        return CPUCapableDeepSpeedStrategy(stage=int(trainer.strategy[-1]), offload_optimizer=trainer.offload_optimizer,
                                           offload_parameters=trainer.offload_parameters)
    return trainer.strategy


def block_classes(model: nn.Module) -> tuple[type[nn.Module], ...]:
    """The transformer-block classes the model's parts declare (``layer_cls``): the shard and checkpointing units."""
    found = {m.layer_cls for m in model.modules() if isinstance(getattr(m, "layer_cls", None), type)}
    return tuple(sorted(found, key=lambda c: c.__qualname__))


class _AtomicSharded:
    """Sharded checkpoint directories written beside the last good one and swapped in after every rank wrote."""

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        final = Path(self.broadcast(str(filepath)))
        partial = final.with_name(f".{final.name}.partial")
        if self.is_global_zero:
            shutil.rmtree(partial, ignore_errors=True)
        self.barrier("checkpoint-begin")
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier("checkpoint-written")
        if self.is_global_zero:
            replace_dir(partial, final)
        self.barrier("checkpoint-end")

    def remove_checkpoint(self, filepath: Any) -> None:
        path = Path(filepath)
        if self.is_global_zero and path.is_dir():
            shutil.rmtree(path)
        elif self.is_global_zero and path.exists():
            path.unlink()


class FSDP2Strategy(_AtomicSharded, ModelParallelStrategy):
    """FSDP2 over a 1-D data-parallel mesh of ``world`` ranks; :meth:`shard` runs from ``MLLMModule.configure_model``."""

    def __init__(self, world: int, mixed_precision: bool = False, offload_parameters: bool = False) -> None:
        super().__init__(data_parallel_size=world, tensor_parallel_size=1, save_distributed_checkpoint=True)
        self.mixed_precision = mixed_precision
        self.offload_parameters = offload_parameters

    def shard(self, model: nn.Module) -> None:
        from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

        if isinstance(model, FSDPModule):  # configure_model runs again for a later fit/validate
            return
        kwargs: dict[str, Any] = {"mesh": self.device_mesh["data_parallel"]}
        if self.mixed_precision:
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if self.offload_parameters:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        units = block_classes(model)
        for module in reversed(list(model.modules())):  # inner units before the ones that hold them
            if isinstance(module, units) and module is not model:
                fully_shard(module, **kwargs)
        fully_shard(model, **kwargs)


class CPUCapableDeepSpeedStrategy(_AtomicSharded, DeepSpeedStrategy):
    """Lightning's DeepSpeed strategy, also on CPU (gloo), and without a second division of the loss by the
    accumulation count (Lightning already divides; DeepSpeed's engine would divide again)."""

    def setup_environment(self) -> None:
        if self.root_device.type == "cuda":
            return super().setup_environment()
        DDPStrategy.setup_environment(self)  # Lightning's DeepSpeed refuses a non-CUDA accelerator here

    def setup_distributed(self) -> None:
        if self.root_device.type == "cuda":
            return super().setup_distributed()
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def backward(self, closure_loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        return super().backward(closure_loss, optimizer, *args, scale_wrt_gas=False, **kwargs)

    def _setup_model_and_optimizer(self, model: nn.Module, optimizer: Any, lr_scheduler: Any = None) -> tuple[Any, Any]:
        import deepspeed

        if self.zero_stage_3:
            for module in model.modules():
                if isinstance(module, VisionEncoder):
                    for reader, param in module.external_parameters():
                        deepspeed.zero.register_external_parameter(reader, param)
            # A connector returns a ConnectorOutput, which ZeRO-3's hooks do not look into, so nothing would gather its
            # own parameters (learned queries, ...) again for backward. Registered with the root module instead they stay
            # gathered for the whole step: small, and replicated on every rank like under ZeRO-2.
            for module in model.modules():
                if isinstance(module, Connector):
                    for param in _own_parameters(module):
                        deepspeed.zero.register_external_parameter(model, param)

        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.root_device.index if self.root_device.type == "cuda" else self.local_rank),
            config=self.config, model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
            optimizer=optimizer, lr_scheduler=lr_scheduler, dist_init_required=False)
        return engine, ds_optimizer


def _own_parameters(connector: nn.Module) -> list[nn.Parameter]:
    """Parameters a connector's own modules hold directly (learned queries, position embeddings, the image newline) as
    opposed to those inside torch layers (Linear, LayerNorm, ...)."""
    return [p for m in connector.modules() if not type(m).__module__.startswith("torch.") for p in m.parameters(recurse=False)]


def consolidate(strategy: Strategy, model: nn.Module) -> None:
    """After training under a sharded strategy, put the full weights into ``model`` on rank 0 (for ``final/``); a no-op
    where nothing is sharded. A collective: every rank calls it."""
    full = full_state_dict(strategy, model)
    if full is not None and strategy.is_global_zero:
        materialize(model, full)


def full_state_dict(strategy: Strategy, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The unsharded weights of ``model`` (the module inside the LightningModule), on CPU, on rank 0; ``None`` when
    the model is not sharded (it can be saved as it is). A collective: every rank calls it."""
    if isinstance(strategy, FSDP2Strategy):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3:
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        full: dict[str, torch.Tensor] = {}
        # One module at a time: beyond its shard a rank holds one module's parameters (rank 0 also the CPU copy).
        for prefix, module in model.named_modules():
            params = list(module.parameters(recurse=False))
            with GatheredParameters(params, modifier_rank=None):
                if strategy.is_global_zero:
                    for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                        full[f"{prefix}.{name}" if prefix else name] = tensor.detach().cpu().clone()
        return full
    return None


def materialize(model: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Put the full weights back into ``model`` as plain tensors (rank 0, before saving ``final/``). Parameters that
    were shared (tied embeddings) stay shared, whichever of their names ``full`` keys them by."""
    entries = [(f"{prefix}.{name}" if prefix else name, module, name, param)
               for prefix, module in model.named_modules(remove_duplicate=False) for name, param in module._parameters.items()
               if param is not None]
    shared = {id(p): nn.Parameter(_own(full[key]), requires_grad=p.requires_grad) for key, _, _, p in reversed(entries) if key in full}
    missing = [key for key, _, _, p in entries if id(p) not in shared]
    if missing:
        raise ConfigError(f"consolidating the weights for final/: no full tensor for {', '.join(missing[:5])}.")
    for _, module, name, param in entries:
        module._parameters[name] = shared[id(param)]
    for prefix, module in model.named_modules(remove_duplicate=False):
        for name, buf in module._buffers.items():
            key = f"{prefix}.{name}" if prefix else name
            if buf is not None and key in full:
                module._buffers[name] = _own(full[key])


def _own(tensor: torch.Tensor) -> torch.Tensor:
    # Gathered tensors can be views into one flat buffer; safetensors refuses to save a view of a larger storage.
    return tensor if tensor.untyped_storage().nbytes() == tensor.nbytes else tensor.clone()


@contextlib.contextmanager
def full_parameters(model: nn.Module) -> Iterator[None]:
    """Gather the FSDP2 root unit's parameters (connector, embeddings, head) for code that calls the model's parts
    directly rather than through ``model.forward`` (generation); the blocks gather themselves."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()
