"""The model mixin: builds an upstream model class of a :class:`~vllm_fse.core.construction.MoeFamily`
under :func:`~vllm_fse.core.decision.plan_fse`'s plan and loads its weights with slot verification."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from vllm_fse.auto.switch_point import SwitchPoint
from vllm_fse.core.construction import SPLIT_MLP, MoeFamily, moe_construction
from vllm_fse.core.decision import FsePath, FsePlan, FseSwitch, compiled_on_cpu, plan_fse
from vllm_fse.core.layer import SharedSlotExperts, layer_class
from vllm_fse.core.plan_log import check_draft_agrees_with_target, log_plan, record_target_plan
from vllm_fse.core.weights import load_with_fused_shared_experts
from vllm_fse.patches import keep_freed_cpu_heap, keep_inductor_order_of_out_variant_kernels


class FusedSharedExpertsMixin:
    """Put before an upstream model class of a :class:`MoeFamily`: builds it under
    :func:`plan_fse`'s plan and loads its weights through the splitter with slot verification.

    An adapter sets ``fse_family`` and, for an MTP draft, ``fse_draft = True``; that is all it
    has to say. MoE blocks sit at ``model.layers[i].mlp`` (GLM/DeepSeek drafts:
    ``model.layers[str(i)].mtp_block.mlp``), as every supported family has them upstream; a
    wrapper whose decoder layers sit elsewhere overrides :meth:`fse_decoder_layers`.
    """

    fse_family: MoeFamily
    fse_draft: bool = False
    fse_plan: FsePlan

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        family = self.fse_family
        model_config = vllm_config.model_config
        plan = plan_fse(
            vllm_config,
            aiter_capable=family.aiter_capable,
            shared_expert_name=family.shared_expert_name,
            moe_layers=family.moe_layer_indices(getattr(model_config, "hf_text_config", None) or model_config.hf_config),
        )
        if plan.enabled and compiled_on_cpu(vllm_config):
            # Before construction: the model's compile backend copies the Inductor options.
            keep_inductor_order_of_out_variant_kernels(vllm_config)
            if plan.switch is FseSwitch.AUTO:  # only ever on the backend-neutral path
                keep_freed_cpu_heap()  # the split path's torch.cond branch frees its buffers every step
        switch, layer_cls = None, SharedSlotExperts
        if plan.path is FsePath.BACKEND_NEUTRAL:
            max_tokens = vllm_config.scheduler_config.max_num_batched_tokens
            switch = (
                SwitchPoint.auto_switch(plan.fused_max_tokens, max_tokens)
                if plan.switch is FseSwitch.AUTO
                else SwitchPoint.always_fused(max_tokens)
            )
            layer_cls = layer_class(vllm_config.additional_config)
        dtype = vllm_config.model_config.dtype
        with moe_construction(self.fse_family, plan, switch, dtype, layer_cls):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.fse_plan = plan
        self.fse_switch = switch
        self.fse_hf_config = getattr(vllm_config.model_config, "hf_text_config", None) or vllm_config.model_config.hf_config
        blocks = self.fse_moe_blocks()
        widened = sum(getattr(m, "fse_shared_slots", None) is not None for m in self.modules())
        if widened != sum(getattr(b.experts, "fse_shared_slots", None) is not None for b in blocks.values()):
            # A block the plugin cannot find would keep an unloaded split MLP and unverified slots.
            raise RuntimeError(
                f"vllm-fse: {type(self).__name__} built {widened} fused MoE layers but finds "
                f"{len(blocks)} MoE blocks under its decoder layers"
            )
        for block in blocks.values():
            slots = getattr(block.experts, "fse_shared_slots", None)
            if slots is None:
                continue
            if slots.replaced_shared_mlp is not None:
                for name, child in list(block.named_children()):
                    if child is slots.replaced_shared_mlp:
                        setattr(block, name, None)
                slots.replaced_shared_mlp = None
            if slots.split_mlp is not None:
                # Under the block, so the checkpoint's shared-expert tensors load into it.
                block.add_module(SPLIT_MLP, slots.split_mlp)
        if switch is None:
            log_plan(type(self).__name__, plan, self.fse_moe_blocks())
        # else: once the weights are processed (process_weights_after_loading), since the plan line
        # says where the split path's weights live.
        # The compiled graph reads the switch point: __call__ measures it before the first forward.
        self.fse_resolve_before_forward = None
        if switch is not None and switch.auto and not switch.resolved and compiled_on_cpu(vllm_config):
            self.fse_resolve_before_forward = next(
                (s for s in (getattr(b.experts, "fse_shared_slots", None) for b in blocks.values()) if s), None
            )
        if self.fse_draft:
            check_draft_agrees_with_target(plan)
        else:
            record_target_plan(plan)

    def __call__(self, *args, **kwargs):
        # Not a forward pre-hook: a model class compiled as a whole (support_torch_compile on the
        # MTP drafts) replaces nn.Module.__call__ by one that runs the compiled code and skips
        # hooks. This __call__ precedes it (the mixin comes first), outside the graph.
        slots = self.fse_resolve_before_forward
        if slots is not None:
            self.fse_resolve_before_forward = None
            slots.resolve_before_forward()
        return super().__call__(*args, **kwargs)

    def process_weights_after_loading(self) -> None:
        # vLLM's model-level hook, after every layer processed its weights for its kernel: the
        # split path's dense MLP reads a shared slot where that holds the same matrices.
        upstream = getattr(super(), "process_weights_after_loading", None)
        if upstream is not None:
            upstream()
        if self.fse_switch is None:
            return
        blocks = self.fse_moe_blocks()
        for block in blocks.values():
            slots = getattr(block.experts, "fse_shared_slots", None)
            if slots is not None:
                slots.read_split_weights_from_slot()
        log_plan(type(self).__name__, self.fse_plan, blocks)

    def fse_decoder_layers(self) -> torch.nn.Module:
        """The model's ``layers`` container (a multimodal wrapper overrides where it sits)."""
        return self.model.layers

    def fse_moe_blocks(self) -> dict[int, torch.nn.Module]:
        """Layer index -> MoE block, for the layers this rank holds (pipeline ranks hold
        ``PPMissingLayer`` elsewhere)."""
        block_cls = self.fse_family.moe_block_cls()
        layers = self.fse_decoder_layers()
        items = layers.items() if isinstance(layers, torch.nn.ModuleDict) else enumerate(layers)
        found = ((int(i), getattr(getattr(layer, "mtp_block", layer), "mlp", None)) for i, layer in items)
        return {i: block for i, block in found if isinstance(block, block_cls)}

    def fse_checkpoint_weights(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterable[tuple[str, torch.Tensor]]:
        if self.fse_draft:
            return weights
        # MTP tensors belong to the draft model: drop them before splitting.
        prefix = self.fse_family.draft_prefix
        if prefix is not None:
            return ((name, tensor) for name, tensor in weights if not name.startswith(prefix))
        from vllm.model_executor.models.utils import skip_spec_layers

        return skip_spec_layers(weights, self.fse_hf_config)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_with_fused_shared_experts(
            self.fse_checkpoint_weights(weights),
            super().load_weights,
            plan=self.fse_plan,
            hf_config=self.fse_hf_config,
            model=self,
            moe_blocks=self.fse_moe_blocks(),
            family=self.fse_family,
        )
