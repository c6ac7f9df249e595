"""A mixture of vision encoders: named members, each an ordinary encoder spec (specs/components.md §5).

Every member keeps its own resolution, layer selection and CLS policy, and runs once per image. Its input comes one of
two ways (``normalize``):

* ``per_member`` (default; Cambrian, MoVA, COMM, Prismatic): one decoded image is resized and normalised by each
  member's own transform (:class:`~mllm_kit.data.transforms.MixtureTransform`);
* ``shared`` (Eagle): the image is resized and normalised once, by the transform of the highest-resolution member, and
  every other member receives that normalised tensor bilinearly resized (align_corners=True) to its own image size —
  NVlabs/Eagle ``multi_backbone_channel_concatenation_encoder.py`` (``forward``; the one image processor is the
  ConvNeXt tower's, CLIP mean/std at 1024 px).

The connector receives one :class:`VisualFeatures` per member, in member order (``in_dims`` and ``grids`` have one
entry per member), and a fusion connector (``channel_concat``, ``sequence_concat``, ``comm``, ``mova``, ``sva``)
combines them. Members are submodules ``encoder.members.<name>``: a stage trains or freezes them by that path and gives
them their own learning rate (``module_lr``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mllm_kit.data.transforms import ImageTransform, MixtureTransform
from mllm_kit.encoders.base import VisionEncoder, VisualFeatures
from mllm_kit.errors import ConfigError, did_you_mean
from mllm_kit.registry import ENCODERS, register_encoder

NORMALIZE = ("per_member", "shared")


@register_encoder("mixture")
class MixtureEncoder(VisionEncoder):
    nested_spec_maps: ClassVar[dict[str, str]] = {"members": "encoders"}

    """``members``: name → encoder spec (resolved at recipe load, presets with overrides). The first member is the
    *base*: its width, grid and token count are the mixture's ``embed_dim`` / ``grid`` / ``num_tokens`` (what
    MoVA's base encoder and Cambrian's global context read).

    ``order``: the member order, when ``members`` cannot keep it (a saved mixture's sorted JSON). ``resample``: name → ``[rows, cols]``: that member's feature maps (every layer) are bilinearly resized
    (align_corners=True, as Eagle and Cambrian resize theirs) to this grid before the connector sees them — e.g.
    Cambrian's 576-token towers and 96×96 ConvNeXt. ``path``: the directory a saved mixture's members live in
    (their ``path`` is relative to it; :meth:`save_pretrained` writes it).

    ``normalize``: ``per_member`` (default) — each member's own transform (size, resize mode, mean/std); pixels
    ``[n_img, Σ 3·Hᵢ·Wᵢ]``, every member's normalised image flattened in member order. ``shared`` (Eagle) — one
    transform, the highest-resolution member's (the first, on a tie): pixels ``[n_img, 3, S, S]``, and member i reads
    them resized to ``Sᵢ × Sᵢ`` (bilinear, align_corners=True, in float32, as Eagle's tower does); the other members'
    own resize mode and mean/std are not used (Eagle feeds its SAM, EVA and Pix2Struct towers the ConvNeXt's
    CLIP-normalised input).
    """

    def __init__(self, members: Mapping[str, Any], resample: Mapping[str, list[int]] | None = None,
                 path: str | None = None, order: list[str] | None = None, normalize: str = "per_member") -> None:
        super().__init__(select_layer=-1, select_feature="patch", frozen=False)
        if normalize not in NORMALIZE:
            raise ConfigError(f"encoder.normalize: {normalize!r} is not one of {', '.join(NORMALIZE)} (per_member: each member "
                              "resizes and normalises the image itself; shared: one input for all, as Eagle).")
        self.normalize = normalize
        if not isinstance(members, Mapping) or not members:
            raise ConfigError("encoder.members: a mixture needs a mapping of at least one member name → encoder spec.")
        if order is not None:
            if sorted(order) != sorted(members):
                raise ConfigError(f"encoder.order: {list(order)} must list the members {list(members)} once each.")
            members = {name: members[name] for name in order}
        built = {}
        for name, spec in members.items():
            if not isinstance(name, str) or not name.isidentifier():
                raise ConfigError(f"encoder.members: member name {name!r} must be an identifier (it becomes a module path).")
            spec = dict(spec)
            if spec.get("path") is not None and path is not None and not Path(spec["path"]).is_absolute():
                spec["path"] = str(Path(path) / spec["path"])
            try:
                built[name] = ENCODERS.build(spec)
            except ConfigError as err:
                raise ConfigError(f"encoder.members.{name}: {err}") from None
        self.members = nn.ModuleDict(built)
        self._resample: dict[str, tuple[int, int]] = {}
        for name, grid in (resample or {}).items():
            if name not in self.members:
                raise ConfigError(f"encoder.resample.{name}: no member named {name!r}.{did_you_mean(name, list(self.members))} "
                                  f"Members: {', '.join(self.members)}.")
            if len(grid) != 2 or min(int(v) for v in grid) < 1:
                raise ConfigError(f"encoder.resample.{name}: expected [rows, cols] of positive integers, got {grid!r}.")
            member = self.members[name]
            if member.drop_first_patch or member.select_feature != "patch":
                # drop_first_patch leaves a (1, rows·cols − 1) token list; a CLS token has no place on the grid.
                raise ConfigError(f"encoder.resample.{name}: member {name!r} gives no 2-D patch grid to resample "
                                  f"(select_feature {member.select_feature!r}, drop_first_patch {member.drop_first_patch}); "
                                  f"set select_feature: patch and drop_first_patch: false on it.")
            self._resample[name] = (int(grid[0]), int(grid[1]))
        base = self.base
        self.embed_dim, self.num_layers, self.patch_size = base.embed_dim, base.num_layers, base.patch_size
        self.image_size, self.num_prefix_tokens, self.layer_cls = base.image_size, 0, base.layer_cls
        transforms = tuple(m.image_transform for m in self.members.values())
        self._input_sizes = [t.size for t in transforms]
        self.image_transform: ImageTransform | MixtureTransform = (
            max(transforms, key=lambda t: t.size) if normalize == "shared" else MixtureTransform(transforms))

    @property
    def base(self) -> VisionEncoder:
        return next(iter(self.members.values()))

    @property
    def feature_names(self) -> list[str]:
        return list(self.members)

    @property
    def feature_depths(self) -> list[int]:
        return [m.num_layers for m in self.members.values()]

    @property
    def patch_grid(self) -> tuple[int, int]:
        return self.feature_grids[0]

    @property
    def num_tokens(self) -> int:
        h, w = self.feature_grids[0]
        return self.base.num_tokens if self.feature_names[0] not in self._resample else h * w

    @property
    def selected_layer(self) -> int:
        return self.base.selected_layer

    @property
    def blocks(self) -> nn.ModuleList | nn.Sequential:
        return self.base.blocks

    @property
    def feature_dims(self) -> list[int]:
        return [m.embed_dim for m in self.members.values()]

    @property
    def feature_grids(self) -> list[tuple[int, int]]:
        return [self._resample.get(name, m.grid) for name, m in self.members.items()]

    def member_pixels(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """What each member reads, ``[n_img, 3, Sᵢ, Sᵢ]``: views of ``[n_img, Σ 3·Sᵢ²]`` (``per_member``), or the shared
        ``[n_img, 3, S, S]`` resized to Sᵢ where Sᵢ ≠ S (``shared``; Eagle's ``F.interpolate(x.float(), (Sᵢ, Sᵢ),
        mode="bilinear", align_corners=True).to(x.dtype)``)."""
        if self.normalize == "shared":
            size = self.image_transform.size
            if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
                raise ConfigError(f"mixture encoder (normalize: shared): pixel values of shape {tuple(pixel_values.shape)} are "
                                  f"not the shared input [n_img, 3, {size}, {size}]; build the images with the mixture's "
                                  f"image_transform.")
            return [pixel_values if s == size else
                    F.interpolate(pixel_values.float(), size=(s, s), mode="bilinear", align_corners=True).to(pixel_values.dtype)
                    for s in self._input_sizes]
        sizes = [3 * s * s for s in self._input_sizes]
        if pixel_values.dim() != 2 or pixel_values.shape[1] != sum(sizes):
            raise ConfigError(f"mixture encoder: pixel values of shape {tuple(pixel_values.shape)} are not the members' "
                              f"flattened images [n_img, {sum(sizes)}]; build the images with the mixture's image_transform.")
        chunks = pixel_values.split(sizes, dim=1)
        return [x.view(-1, 3, s, s) for x, s in zip(chunks, self._input_sizes)]

    def features(self, pixel_values: torch.Tensor) -> list[VisualFeatures]:
        out = []
        for (name, member), pixels in zip(self.members.items(), self.member_pixels(pixel_values)):
            f = member(pixels)
            if name in self._resample:
                f = resample_features(f, self._resample[name])
            out.append(f)
        return out

    def forward(self, pixel_values: torch.Tensor) -> VisualFeatures:
        raise ConfigError("a mixture encoder gives one feature set per member: call features(); connectors read them all.")

    def dummy_pixels(self, device: torch.device | str) -> torch.Tensor:
        if self.normalize == "shared":
            size = self.image_transform.size
            return torch.zeros(1, 3, size, size, device=device, dtype=self.dtype)
        return torch.zeros(1, sum(3 * s * s for s in self._input_sizes), device=device, dtype=self.dtype)

    def enable_activation_checkpointing(self) -> None:
        for member in self.members.values():
            member.enable_activation_checkpointing()

    def save_pretrained(self, directory: Path, weights: bool = True) -> dict[str, Any]:
        members = {}
        for name, member in self.members.items():
            saved = member.save_pretrained(Path(directory) / name, weights=weights)
            members[name] = {**member.build_spec, **saved, "path": name}
        Path(directory).mkdir(parents=True, exist_ok=True)
        return {"path": str(directory), "members": members, "order": list(members)}

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype


def resample_features(features: VisualFeatures, grid: tuple[int, int]) -> VisualFeatures:
    """Every layer's ``[n, h·w, C]`` map on the features' grid bilinearly resized (align_corners=True) to ``grid`` (a no-op
    at equal grids). A CNN's other stages, on grids of their own, are left as they are."""
    if tuple(features.grid) == tuple(grid):
        return features
    h, w = features.grid
    states = tuple(resample_map(x, features.grid, grid) if x.shape[1] == h * w else x for x in features.hidden_states)
    return VisualFeatures(states, tuple(grid), features.selected_layer)


def resample_map(x: torch.Tensor, grid: tuple[int, int], target: tuple[int, int], align_corners: bool = True) -> torch.Tensor:
    """``[n, h·w, C]`` on ``grid`` → ``[n, H·W, C]`` on ``target``, bilinear (Eagle and Cambrian align corners, specs
    §5.1; MoVA's ``feature_align`` does not)."""
    (h, w), (th, tw) = grid, target
    if (h, w) == (th, tw):
        return x
    n, _, c = x.shape
    maps = x.transpose(1, 2).reshape(n, c, h, w)
    maps = F.interpolate(maps.float(), size=(th, tw), mode="bilinear", align_corners=align_corners).to(x.dtype)
    return maps.flatten(2).transpose(1, 2)
