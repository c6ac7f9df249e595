"""Visual-token efficiency inside the LLM: methods that contribute layer steps to every call of a model.

``model.efficiency: {method: fastv, layer: 2, ratio: 0.5}`` in a recipe (or a stage's ``efficiency:``, or an override
of ``eval`` / ``chat`` / ``predict``) names a registered method — FastV (:mod:`.fastv`), PDrop (:mod:`.pdrop`) — or
``_target_: my_pkg.MyMethod``. A method is a :class:`TokenEfficiency`: checked once against the model when it is set,
then asked for the call's steps (:mod:`mllm_kit.llm.steps`) in every forward and generation (docs/efficiency.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from mllm_kit.context import ForwardContext
from mllm_kit.errors import ConfigError, MllmKitError
from mllm_kit.llm.steps import LayerStep, TokenDrop
from mllm_kit.registry import EFFICIENCY, NAME_KEY, TARGET_KEY

if TYPE_CHECKING:
    from mllm_kit.model import MLLM


class TokenEfficiency:
    """Base of a method: :meth:`check` refuses a model it cannot run on (once, when set); :meth:`layer_steps` gives a
    call's steps (``ctx`` is ``None`` when FLOP accounting asks for the schedule without a call)."""

    def check(self, model: MLLM, where: str) -> None:
        """Raise a :class:`~mllm_kit.errors.ConfigError` naming ``where`` (the recipe key) if ``model`` cannot run this."""
        depth = len(model.llm.decoder_layers)
        for drop in self.drops():
            if not 1 <= drop.layer < depth:
                raise ConfigError(f"{where}: drops tokens from LLM layer {drop.layer}, but the LLM has {depth} decoder layers; "
                                  f"choose a layer in 1..{depth - 1}.")
        first = min((d.layer for d in self.drops()), default=depth)
        late = [layer for layer in model.connector.layers_written() if layer > first]
        if late:
            raise ConfigError(f"{where}: connector {type(model.connector).__name__} writes into the image positions of LLM "
                              f"layer(s) {late}, after {type(self).__name__} drops image tokens from layer {first}; drop from "
                              f"layer {max(late)} on, or turn the method off.")

    def layer_steps(self, ctx: ForwardContext | None) -> list[LayerStep]:
        return list(self.drops())

    def drops(self) -> Sequence[TokenDrop]:
        """The method's drop steps, in layer order (what FLOP accounting reads)."""
        return ()


def build_efficiency(spec: Mapping[str, Any] | str | None, model: MLLM, where: str = "model.efficiency") -> TokenEfficiency | None:
    """A method from ``{method: name, **options}`` (or ``name``, or ``_target_``), checked against ``model``."""
    if spec is None or spec == {} or (isinstance(spec, Mapping) and spec.get("method") in (None, "none") and TARGET_KEY not in spec
                                      and NAME_KEY not in spec):
        return None
    if isinstance(spec, Mapping):
        spec = dict(spec)
        if "method" in spec:
            spec[NAME_KEY] = spec.pop("method")
    try:
        method = EFFICIENCY.build(spec)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    except MllmKitError as err:
        raise ConfigError(f"{where}: {err}") from None
    if not isinstance(method, TokenEfficiency):
        raise ConfigError(f"{where}: {type(method).__name__} is not a TokenEfficiency (mllm_kit.efficiency).")
    method.check(model, where)
    return method




def override_efficiency(model: MLLM, changes: Mapping[str, Any] | None, where: str = "model.efficiency") -> None:
    """Change ``model``'s method for inference: ``{"method": "none"}`` turns it off, ``{"method": "pdrop", ...}`` picks
    another, other keys change options of the current one (``{"ratio": 0.75}``)."""
    if not changes:
        return
    if changes.get("method") in ("none", "off", False):
        model.set_efficiency(None, where)
        return
    current = dict(getattr(model.efficiency, "build_spec", None) or {})
    if "method" in changes and changes["method"] != current.get(NAME_KEY):
        current = {NAME_KEY: changes["method"]}
    elif not current:
        raise ConfigError(f"{where}: the model uses no efficiency method whose options could change; name one first "
                          f"(model.efficiency.method=fastv).")
    model.set_efficiency({**current, **{k: v for k, v in changes.items() if k != "method"}}, where)


__all__ = ["TokenEfficiency", "build_efficiency", "override_efficiency"]
