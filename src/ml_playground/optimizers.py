"""The optimizer `[model] optimizer` names: AdamW alone, or Muon and AdamW stepping as one.

Lightning's automatic optimization drives one optimizer per step: it runs the closure (forward
and backward), clips the gradients of `optimizer.param_groups`, accumulates, steps the
learning-rate scheduler over those groups and saves `optimizer.state_dict()` in checkpoints.
Manual optimization would hand all of that back to us (Lightning refuses
`gradient_clip_val` and `accumulate_grad_batches` with it), so `MuonWithAdamW` is one
`torch.optim.Optimizer` whose groups and state are those of a `torch.optim.Muon` and a
`torch.optim.AdamW`; its `step` steps both. Each group carries `"optimizer"`, the name of the
one that updates it, which checkpoints keep.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

OptimizerName = Literal["adamw", "muon"]


class MuonWithAdamW(torch.optim.Optimizer):
    """`torch.optim.Muon` over the groups named "muon" and `torch.optim.AdamW` over those named
    "adamw", as one optimizer: its `param_groups` are the two optimizers' group dicts and its
    `state` is theirs, so clipping, the scheduler and `state_dict` see every parameter."""

    def __init__(
        self, param_groups: Sequence[dict[str, Any]], muon: dict[str, Any], adamw: dict[str, Any]
    ) -> None:
        self.muon = torch.optim.Muon([g for g in param_groups if g["optimizer"] == "muon"], **muon)
        self.adamw = torch.optim.AdamW(
            [g for g in param_groups if g["optimizer"] == "adamw"], **adamw
        )
        # The same dicts: the scheduler's changes of "lr" reach the optimizer that uses it.
        super().__init__([*self.muon.param_groups, *self.adamw.param_groups], defaults={})
        self._share()

    def _share(self) -> None:
        """Point both optimizers at this one's groups and state (again after a load, which
        replaces them)."""
        self.muon.param_groups = [g for g in self.param_groups if g["optimizer"] == "muon"]
        self.adamw.param_groups = [g for g in self.param_groups if g["optimizer"] == "adamw"]
        self.muon.state = self.adamw.state = self.state  # disjoint parameters: one dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._share()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss


def group_names(optimizer_state: dict[str, Any]) -> list[str]:
    """Which optimizer updates each group of a saved optimizer state (checkpoints written
    before Muon existed hold AdamW groups without the name)."""
    return [g.get("optimizer", "adamw") for g in optimizer_state.get("param_groups", [])]
