"""The vision-encoder contract every encoder implements (DESIGN.md, "Core interfaces")."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.utils.checkpoint
from torch import nn

from mllm_kit.data.transforms import ImageTransform
from mllm_kit.errors import ConfigError

SelectFeature = Literal["patch", "cls_patch"]
SELECT_FEATURES = ("patch", "cls_patch")


class _CastOnRead(tuple):
    """A tuple of tensors whose items come out in ``dtype``, each cast the first time it is read (VisualFeatures.to)."""

    def __new__(cls, items: tuple[torch.Tensor, ...], dtype: torch.dtype) -> _CastOnRead:
        self = super().__new__(cls, items)
        self._dtype, self._cast = dtype, {}
        return self

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return tuple(self[i] for i in range(*index.indices(len(self))))
        i = range(len(self))[index]  # negative indices, and IndexError as a tuple raises it
        if i not in self._cast:
            self._cast[i] = super().__getitem__(i).to(self._dtype)
        return self._cast[i]

    def __iter__(self):
        return (self[i] for i in range(len(self)))


@dataclass
class VisualFeatures:
    """Per-layer encoder outputs for a batch of images.

    ``hidden_states[k]`` is ``[n_img, N, C]`` in HF indexing (0 = embeddings, k = output of block k,
    no post-norm), already stripped of prefix tokens according to ``select_feature`` (and of the first patch
    with ``drop_first_patch``). ``grid`` is the encoder's :attr:`VisionEncoder.grid`.
    ``selected_layer`` (non-negative) is the encoder's default feature layer. ``crops`` holds the features
    of the high-resolution crops (``crop_grids``: one ``(rows, cols)`` per image) for connectors that read them;
    ``image_sizes``: each image's original ``(width, height)``, when the batch carries them.
    """

    hidden_states: tuple[torch.Tensor, ...]
    grid: tuple[int, int]
    selected_layer: int
    crops: VisualFeatures | None = None
    crop_grids: list[tuple[int, int]] | None = None
    image_sizes: list[tuple[int, int]] | None = None

    def split(self, n: int) -> tuple[VisualFeatures, VisualFeatures]:
        """The first ``n`` images and the rest, as two feature sets (views, no copies)."""
        head = tuple(h[:n] for h in self.hidden_states)
        tail = tuple(h[n:] for h in self.hidden_states)
        return VisualFeatures(head, self.grid, self.selected_layer), VisualFeatures(tail, self.grid, self.selected_layer)

    def to(self, dtype: torch.dtype) -> VisualFeatures:
        """The same features in ``dtype`` (itself when they already are): an encoder held in another precision than
        the connector (a frozen ``dtype: bfloat16`` tower) hands its features over in the connector's. A layer is
        cast when it is read, once: a connector reading one of 25 layers does not pay for 24 fp32 copies."""
        crops = self.crops.to(dtype) if self.crops is not None else None
        if crops is self.crops and all(h.dtype == dtype for h in self.hidden_states):
            return self
        return replace(self, hidden_states=_CastOnRead(self.hidden_states, dtype), crops=crops)

    @property
    def selected(self) -> torch.Tensor:
        """The default feature map, ``[n_img, N, C]``."""
        return self.hidden_states[self.selected_layer]


class VisionEncoder(nn.Module):
    """Base class: subclasses build the backbone and implement :meth:`backbone_hidden_states`.

    The base class owns what is common to every ViT: layer selection (``select_layer``, HF
    ``hidden_states`` indexing, default -2 as in LLaVA-1.5, specs/components.md §1.1), CLS handling
    (``select_feature``), freezing and the image transform.

    ``select_feature``: ``patch`` strips every prefix token (CLS, registers); ``cls_patch`` keeps the CLS
    first (N = patches + 1). ``drop_first_patch`` (towers without prefix tokens only) also drops the first
    patch token, as transformers' LLaVA ``default`` strategy does on a SigLIP tower (it drops token 0
    whatever it is): N = rows·cols − 1, and :attr:`grid` becomes ``(1, N)`` since the tokens no longer form
    the patch grid, so connectors that need a square grid (deepstack, matryoshka) refuse it with ConfigError.
    """

    embed_dim: int
    num_layers: int
    image_size: int
    patch_size: int
    num_prefix_tokens: int
    layer_cls: type[nn.Module]
    image_transform: ImageTransform

    def __init__(self, select_layer: int = -2, select_feature: SelectFeature = "patch", frozen: bool = True,
                 drop_first_patch: bool = False) -> None:
        super().__init__()
        if select_feature not in SELECT_FEATURES:
            raise ConfigError(f"encoder select_feature must be one of {SELECT_FEATURES}, got {select_feature!r}.")
        if not isinstance(drop_first_patch, bool):
            raise ConfigError(f"encoder drop_first_patch must be true or false, got {drop_first_patch!r}.")
        self.select_layer = select_layer
        self.select_feature = select_feature
        self.drop_first_patch = drop_first_patch
        self.frozen = frozen
        self.checkpoint_blocks = False

    def enable_activation_checkpointing(self) -> None:
        """Recompute each block's activations in backward instead of storing them (``trainer.activation_checkpointing``;
        it saves memory only where the encoder trains)."""
        self.checkpoint_blocks = True

    def external_parameters(self) -> list[tuple[nn.Module, nn.Parameter]]:
        """``(module, parameter)`` pairs where ``module``'s forward reads a parameter it does not own (timm's cls token
        and ``pos_embed``, read by ``VisionTransformer._pos_embed``): ZeRO-3 gathers a parameter only around its own
        module's forward and backward, so training/strategies.py registers these with the module that reads them."""
        return []

    def run_block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.checkpoint_blocks and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        return block(x)

    def finish_init(self) -> None:
        """Validate options against the built backbone; subclasses call this at the end of ``__init__``."""
        n = self.num_layers + 1
        if not -n <= self.select_layer < n:
            raise ConfigError(
                f"encoder select_layer={self.select_layer} is out of range for {self.num_layers} blocks "
                f"(valid: {-n}..{n - 1}, HF hidden_states indexing)."
            )
        if self.select_feature == "cls_patch" and self.num_prefix_tokens == 0:
            raise ConfigError(f"{type(self).__name__} has no CLS token; use select_feature: patch.")
        if self.drop_first_patch:
            name, (h, w) = type(self).__name__, self.patch_grid
            if self.num_prefix_tokens:
                raise ConfigError(
                    f"encoder drop_first_patch is for towers without prefix tokens (it drops a real patch, as "
                    f"transformers' LLaVA 'default' strategy does on SigLIP); {name} has {self.num_prefix_tokens} "
                    f"prefix token(s), which are stripped without it."
                )
            if h * w < 2:
                raise ConfigError(f"encoder drop_first_patch would leave no tokens from a {h}×{w} patch grid.")
            if self.grid != (1, h * w - 1):
                raise ConfigError(f"{name} does not support drop_first_patch: it overrides grid "
                                  f"(an encoder that supports it overrides patch_grid instead).")
        if self.frozen:
            self.requires_grad_(False)

    @property
    def blocks(self) -> nn.ModuleList | nn.Sequential:
        """The transformer blocks, in order (for hooks that act between blocks, e.g. DeepStack-V)."""
        return find_layer_list(self, self.num_layers)

    @property
    def patch_grid(self) -> tuple[int, int]:
        """``(rows, cols)`` of patches the backbone produces per image (subclasses override this)."""
        side = self.image_size // self.patch_size
        return (side, side)

    @property
    def grid(self) -> tuple[int, int]:
        """Layout of the patch tokens in the features: :attr:`patch_grid`, or ``(1, rows·cols − 1)`` with
        ``drop_first_patch`` (a token list, no longer a 2-D grid)."""
        h, w = self.patch_grid
        return (1, h * w - 1) if self.drop_first_patch else (h, w)

    @property
    def num_tokens(self) -> int:
        """Tokens per image after prefix stripping: ``grid`` rows·cols, + 1 with ``cls_patch``."""
        h, w = self.grid
        return h * w + (1 if self.select_feature == "cls_patch" else 0)

    @property
    def selected_layer(self) -> int:
        return self.select_layer % (self.num_layers + 1)

    def backbone_hidden_states(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """All ``num_layers + 1`` hidden states ``[n_img, P + N, C]`` including prefix tokens."""
        raise NotImplementedError

    # -- what a connector reads: one feature set per member (a single encoder is a mixture of one) -----------
    @property
    def feature_dims(self) -> list[int]:
        """Channel width of each feature set :meth:`features` returns (``in_dims`` of the connector)."""
        return [self.embed_dim]

    @property
    def feature_grids(self) -> list[tuple[int, int]]:
        """Token grid of each feature set :meth:`features` returns."""
        return [self.grid]

    @property
    def feature_depths(self) -> list[int]:
        """Block count of each feature set's encoder (its hidden states are 0..depth)."""
        return [self.num_layers]

    @property
    def feature_names(self) -> list[str]:
        """Name of each feature set :meth:`features` returns (a mixture's member names)."""
        return ["encoder"]

    def features(self, pixel_values: torch.Tensor) -> list[VisualFeatures]:
        """``pixel_values`` → one :class:`VisualFeatures` per feature set (here one; a mixture has one per member)."""
        return [self(pixel_values)]

    def dummy_pixels(self, device: torch.device | str) -> torch.Tensor:
        """One all-zero image of the input shape :meth:`features` takes."""
        return torch.zeros(1, 3, self.image_size, self.image_size, device=device, dtype=self.dtype)

    def forward(self, pixel_values: torch.Tensor) -> VisualFeatures:
        """``pixel_values [n_img, 3, H, W]`` → :class:`VisualFeatures`."""
        trainable = any(p.requires_grad for p in self.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and trainable):
            states = self.backbone_hidden_states(pixel_values.to(self.dtype))
        p = self.num_prefix_tokens
        if self.select_feature == "patch":
            start = p + int(self.drop_first_patch)  # p == 0 with drop_first_patch (finish_init)
            states = tuple(h[:, start:] for h in states)
        elif p > 1:  # keep CLS, drop register tokens
            states = tuple(torch.cat([h[:, :1], h[:, p:]], dim=1) for h in states)
        return VisualFeatures(hidden_states=states, grid=self.grid, selected_layer=self.selected_layer)

    def save_pretrained(self, directory: Path, weights: bool = True) -> dict[str, Any]:
        """Write the backbone to ``directory`` (with ``weights=False``, only what rebuilds its architecture: a
        transformed model stores its weights elsewhere); return the spec fields that make it load from there."""
        raise NotImplementedError(f"{type(self).__name__} cannot save itself; implement save_pretrained().")

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


def find_layer_list(module: nn.Module, num_layers: int) -> nn.ModuleList:
    """The ``nn.ModuleList`` of ``num_layers`` transformer blocks inside an arbitrary backbone."""
    for child in module.modules():
        if isinstance(child, nn.ModuleList) and len(child) == num_layers:
            return child
    raise ConfigError(f"could not find the list of {num_layers} blocks in {type(module).__name__}.")
