"""The routed-only path of ``vllm-fse bench crossover`` ("routed" mode): every MoE layer runs its
routed experts alone, no shared expert. Not lossless, never a user setting: the floor any fusing
of the shared expert could reach inside the same compiled graph.

It is a subclass of the core's layer, built through the core's hook: a model whose vLLM
``additional_config`` is :data:`ROUTED_ONLY_CONFIG` builds its MoE layers as
:class:`RoutedOnlySharedSlotExperts` (the config is part of vLLM's compile-cache key, so these
graphs are cached apart from the plugin's own).
"""

from __future__ import annotations

import torch

from vllm_fse.core.layer import LAYER_CLASS_KEY, SharedSlotExperts

ROUTED_ONLY_CONFIG = {LAYER_CLASS_KEY: f"{__name__}:RoutedOnlySharedSlotExperts"}


class RoutedOnlySharedSlotExperts(SharedSlotExperts):
    """The core's fused/split layer plus a third path, the routed experts alone, taken while
    :attr:`routed_only` is set (the compiled CPU graph reads it every step from a runner buffer)."""

    def __init__(self, runner: torch.nn.Module, switch, **kwargs) -> None:
        if not switch.auto:
            raise ValueError("vllm-fse: the routed-only benchmark layer needs a model built with VLLM_FSE=auto")
        super().__init__(runner, switch, **kwargs)
        self._routed_only = False
        self._routed_only_state = torch.zeros(1, dtype=torch.int64)
        runner.register_buffer("fse_routed_only", self._routed_only_state, persistent=False)

    @property
    def routed_only(self) -> bool:
        return self._routed_only

    @routed_only.setter
    def routed_only(self, value: bool) -> None:
        self._routed_only = bool(value)
        self._routed_only_state.fill_(int(value))

    # -- traced into vLLM's compiled CPU graph ---------------------------------------------------

    def _traced_choice(self, fused: torch.Tensor, x, topk_weights, topk_ids) -> torch.Tensor:
        lossless = self.runner.fse_routed_only[0] == 0
        # Routed-only steps are not a lossless path: not counted.
        self.runner.fse_path_calls.add_(torch.stack([fused & lossless, ~fused & lossless]))
        return torch.cond(fused & lossless, self._fused_with_flag, self._split_or_routed_traced,
                          (x, topk_weights, topk_ids, lossless))  # fmt: skip

    def _fused_with_flag(self, x, topk_weights, topk_ids, lossless) -> torch.Tensor:
        # torch.cond's branches take the same operands.
        return self._fused_traced(x, topk_weights, topk_ids)

    def _routed_traced(self, x, topk_weights, topk_ids) -> torch.Tensor:
        return self._forward_modular(x, topk_weights, topk_ids)

    def _split_or_routed_traced(self, x, topk_weights, topk_ids, lossless) -> torch.Tensor:
        return torch.cond(lossless, self._split_traced, self._routed_traced, (x, topk_weights, topk_ids))

    # -- run eagerly (inside the opaque op) ------------------------------------------------------

    def __call__(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        if not self._routed_only:
            return super().__call__(x, topk_weights, topk_ids)
        self._prepare(x, topk_ids)  # bound kernels, resolved switch point, as any step
        return self._experts(x, topk_weights, topk_ids)


def set_routed_only(model: torch.nn.Module, on: bool) -> None:
    """Run the live model's following steps routed-only (``on``) or as the core chooses. Turning it
    on needs a model built with :data:`ROUTED_ONLY_CONFIG`: a graph without the routed branch would
    run split instead, a wrong measurement."""
    layers = [m.fse_shared_slots for m in model.modules() if getattr(m, "fse_shared_slots", None) is not None]
    if on and not (layers and all(isinstance(layer, RoutedOnlySharedSlotExperts) for layer in layers)):
        raise RuntimeError(
            f"vllm-fse: the routed-only benchmark path needs the model built with additional_config={ROUTED_ONLY_CONFIG!r}"
        )
    for layer in layers:
        if isinstance(layer, RoutedOnlySharedSlotExperts):
            layer.routed_only = on
