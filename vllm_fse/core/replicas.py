"""Where a fused layer's shared slots live under expert parallelism, and which copy a token uses.

A backend-neutral FSE layer appends ``n_shared * R`` slots to the ``n_routed`` routed experts:
replica ``r`` of shared expert ``j`` is global expert ``n_routed + r * n_shared + j``. Token row
``t`` of a step uses replica ``t % R`` of every shared expert, so each token uses exactly one copy
of each shared expert, and the sum is the unfused one whichever copies hold it (they hold the
same weights). vLLM places the slots on expert-parallel ranks like any other expert
(``determine_expert_map``): each global expert lives on exactly one rank.

Under expert parallelism every token needs every shared expert, so what the replicas can buy is
balance: each rank holding, and computing, the same share of the shared work. With vLLM's
``round_robin`` placement (global expert ``e`` on rank ``e % EP``) and ``R = EP / gcd(n_shared,
EP)``, the ``lcm(n_shared, EP)`` slots cover every rank ``n_shared / gcd`` times, and the ``R``
replicas of one shared expert sit ``n_shared`` ids apart, so on ``R`` different ranks. Token ``t``
then puts its shared expert ``j`` on rank ``(n_routed + t * n_shared + j) % EP``: over any ``R``
consecutive tokens each slot is used once and each rank computes the same number of shared rows.
Any other ``R > 1`` either leaves ranks with unequal counts or puts two replicas of one shared
expert on one rank (memory for nothing); ``R = 1`` already balances when ``EP`` divides
``n_shared``. vLLM's ``linear`` placement gives each rank a contiguous id range, which puts every
appended slot on the last rank(s) whatever ``R`` is: there replicas cannot help and ``R = 1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PLACEMENTS = ("linear", "round_robin")


def default_replicas(n_shared: int, ep_size: int, placement: str) -> int:
    """The fewest copies of each shared expert that give every expert-parallel rank the same
    number of shared slots, no rank two copies of one expert (1 where that cannot be had)."""
    if ep_size <= 1 or placement != "round_robin" or n_shared < 1:
        return 1
    return ep_size // math.gcd(n_shared, ep_size)


def spreading_replicas(n_shared: int, ep_size: int, placement: str) -> tuple[int, ...]:
    """The replica counts a user may choose under expert parallelism: 1 (no copy: least memory,
    the shared work on the slots' ranks) and the balanced default."""
    return tuple(sorted({1, default_replicas(n_shared, ep_size, placement)}))


def effective_placement(
    requested: str,
    *,
    ep_size: int,
    dp_size: int = 1,
    pcp_size: int = 1,
    all2all_backend: str = "allgather_reducescatter",
    num_expert_group: int | None = None,
) -> str:
    """The placement vLLM's expert map manager will really use for a layer: vLLM honours
    ``round_robin`` only for grouped-routing models (``num_expert_group > 1``) and, with
    all-to-all kernels, only on the backends that keep round-robin routing tables."""
    if ep_size <= 1:
        return "linear"
    import dataclasses

    from vllm.model_executor.layers.fused_moe.config import FusedMoEParallelConfig
    from vllm.model_executor.layers.fused_moe.expert_map_manager import determine_expert_placement_strategy

    moe_parallel = dataclasses.replace(
        FusedMoEParallelConfig.make_no_parallel(),
        use_ep=True,
        ep_size=ep_size,
        dp_size=dp_size,
        pcp_size=pcp_size,
        all2all_backend=all2all_backend,
    )
    return determine_expert_placement_strategy(requested, moe_parallel, num_expert_group, 0, False)


def shared_slot_ids(rows: int, n_routed: int, n_shared: int, replicas: int = 1) -> torch.Tensor:
    """``[rows, n_shared]``: row ``t``'s shared slots, of replica ``t % replicas`` (round-robin by
    token position; every replica holds the same weights, so the choice changes only where the
    work runs)."""
    replica = torch.arange(rows).remainder(replicas).unsqueeze(1)
    return n_routed + replica * n_shared + torch.arange(n_shared).unsqueeze(0)


@dataclass(frozen=True)
class SharedSlotLayout:
    """The shared slots of one fused MoE layer: ids, copies, and their expert-parallel ranks."""

    n_routed: int
    n_shared: int
    replicas: int = 1
    ep_size: int = 1
    placement: str = "linear"

    @property
    def slots(self) -> range:
        return range(self.n_routed, self.n_routed + self.n_shared * self.replicas)

    def shared_of(self, slot: int) -> tuple[int, int]:
        """(shared expert, replica) that global slot ``slot`` holds."""
        replica, shared = divmod(slot - self.n_routed, self.n_shared)
        return shared, replica

    def token_slots(self, rows: int) -> torch.Tensor:
        """``[rows, n_shared]``: the global ids row ``t`` of a step uses (replica ``t % replicas``)."""
        return shared_slot_ids(rows, self.n_routed, self.n_shared, self.replicas)

    def expert_maps(self) -> list[torch.Tensor | None]:
        """Per expert-parallel rank, vLLM's global -> local expert map of the widened layer."""
        from vllm.model_executor.layers.fused_moe.expert_map_manager import determine_expert_map

        total = self.n_routed + self.n_shared * self.replicas
        return [determine_expert_map(self.ep_size, rank, total, self.placement)[1] for rank in range(self.ep_size)]

    def holders(self) -> list[list[int]]:
        """Per rank, the shared slots (global ids) vLLM's placement gives it."""
        maps = self.expert_maps()
        return [[s for s in self.slots if m is None or int(m[s]) >= 0] for m in maps]

    def spread(self) -> bool:
        """Every rank holds the same number of shared slots and no two copies of one expert."""
        held = self.holders()
        return len({len(h) for h in held}) == 1 and all(
            len({self.shared_of(s)[0] for s in h}) == len(h) for h in held
        )

    def slot_name(self, slot: int) -> str:
        shared, replica = self.shared_of(slot)
        return f"{slot}=S{shared}" + (f"r{replica}" if self.replicas > 1 else "")

    def describe(self, per_slot_bytes: int, n_layers: int, rank: int | None = None) -> str:
        """Which shared slots each rank holds and what they cost it (every MoE layer)."""
        copies = f"{self.replicas} replicas of each shared expert (row t uses replica t % {self.replicas})" \
            if self.replicas > 1 else "one copy of each shared expert"  # fmt: skip
        if self.ep_size <= 1:
            extra = (self.replicas - 1) * self.n_shared * per_slot_bytes * n_layers
            return copies + (f": {format_bytes(extra)} of extra copies in all" if extra else "")
        ranks = []
        for r, held in enumerate(self.holders()):
            names = ", ".join(self.slot_name(s) for s in held) or "none"
            size = format_bytes(len(held) * per_slot_bytes * n_layers)
            ranks.append(f"{'this rank ' if r == rank else ''}{r}: {names} ({size})")
        balance = "every rank holds the same number of shared slots per layer" if self.spread() else (
            "unbalanced: ranks hold unequal numbers of shared slots per layer"
            + (" (linear placement puts the appended slots on the last rank(s))" if self.placement == "linear" else "")
        )  # fmt: skip
        return (f"{copies}; EP {self.ep_size}, {self.placement} placement, {balance}; "
                f"per rank (slot ids per layer, bytes over {n_layers} layers): " + "; ".join(ranks))  # fmt: skip


def format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"
