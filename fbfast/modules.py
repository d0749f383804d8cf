"""`FeedbackMLP` and `from_module`: the network of the seed's training loops, rolled out fused."""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from .functional import rollout


class FeedbackMLP(nn.Module):
    """``fc2(relu(fc1(x)))`` whose output is fed back as (part of) its next input.

    ``in_features = Du + out_features``: the first ``Du`` input features come from the
    exogenous input ``u``, the last ``out_features`` from the fed-back output. The submodules
    are named ``fc1``/``fc2`` so that ``state_dict`` keys match the seed's network.
    """

    def __init__(self, in_features: int, hidden_features: int, out_features: int, *,
                 bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        if in_features < out_features:
            raise ValueError(
                f"FeedbackMLP: in_features ({in_features}) must be >= out_features ({out_features}): "
                "the output is fed back into the last out_features inputs")
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias, device=device, dtype=dtype)

    @property
    def exo_features(self) -> int:
        """``Du``: how many input features come from ``u`` rather than from the feedback."""
        return self.fc1.in_features - self.fc2.out_features

    def forward(self, x: Tensor) -> Tensor:
        """One step: ``x`` is ``(..., in_features)`` = ``[u_t ; x_t]``."""
        return self.fc2(F.relu(self.fc1(x)))

    def rollout(self, x0: Tensor, steps: Optional[int] = None, u: Optional[Tensor] = None,
                delay: int = 1, truncate: Optional[int] = None, backend: str = "auto") -> Tensor:
        """The fused T-step rollout; see `fbfast.rollout` for shapes and modes."""
        return rollout(x0, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
                       steps=steps, u=u, delay=delay, truncate=truncate, backend=backend)

    def extra_repr(self) -> str:
        return f"exo_features={self.exo_features}"


def from_module(module: nn.Module) -> FeedbackMLP:
    """A `FeedbackMLP` view of an existing ``Linear -> ReLU -> Linear`` module.

    Accepts a module with ``fc1``/``fc2`` ``nn.Linear`` attributes whose forward is
    ``fc2(relu(fc1(x)))`` (the seed's ``RecurrentNetwork``), or an
    ``nn.Sequential(Linear, ReLU, Linear)``. The view holds the very same ``nn.Linear``
    objects, so parameters, optimizers and checkpoints of the original keep working.
    """
    if isinstance(module, FeedbackMLP):
        return module
    if isinstance(module, nn.Sequential):
        layers = list(module)
        if not (len(layers) == 3 and isinstance(layers[0], nn.Linear)
                and isinstance(layers[1], nn.ReLU) and isinstance(layers[2], nn.Linear)):
            kinds = ", ".join(type(m).__name__ for m in layers)
            raise TypeError(f"fbfast.from_module: needs nn.Sequential(Linear, ReLU, Linear), got Sequential({kinds})")
        fc1, fc2 = layers[0], layers[2]
    else:
        fc1, fc2 = getattr(module, "fc1", None), getattr(module, "fc2", None)
        if not (isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear)):
            raise TypeError(
                f"fbfast.from_module: {type(module).__name__} has no nn.Linear attributes fc1 and fc2 "
                "and is not nn.Sequential(Linear, ReLU, Linear)")
    if fc1.out_features != fc2.in_features or fc1.in_features < fc2.out_features:
        raise ValueError(
            f"fbfast.from_module: fc1 is Linear({fc1.in_features}, {fc1.out_features}) and fc2 is "
            f"Linear({fc2.in_features}, {fc2.out_features}); need fc1.out == fc2.in and "
            "fc1.in >= fc2.out (the output is fed back into the last fc2.out inputs)")
    view = FeedbackMLP.__new__(FeedbackMLP)
    nn.Module.__init__(view)
    view.fc1, view.fc2 = fc1, fc2
    return view
