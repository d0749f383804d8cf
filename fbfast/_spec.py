"""The network of docs/spec.md §1.1 as data: the activation table and the shape rules.

One table serves every layer of the Python side: the reference (fbfast/reference.py) applies
``Activation.fn``, `resolve_activation` turns what a caller passed (a name or an ``nn`` module)
into the ``(name, param)`` pair that the operator schema takes (csrc/fbfast.cpp), and
`fbfast.from_module` reads ``module_class``/``module_attr`` to recognise a Sequential's
activation modules. The names are the schema's, in the order of ``kActNames`` in
csrc/common/activation.h, so that a new activation is one row here and one case there.
"""

from __future__ import annotations

import numbers
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Activation(NamedTuple):
    name: str  # the schema's and the Python API's spelling
    fn: Callable[[Tensor, float], Tensor]  # act(z, param), the torch function the reference calls
    default_param: Optional[float]  # None: the activation takes no parameter (param is 0.0)
    module_class: type  # the nn module that computes it
    module_attr: Optional[str]  # the module's attribute holding the parameter
    module_approximate: Optional[str] = None  # nn.GELU only: the `approximate` it must have

    def module_repr(self) -> str:
        if self.module_approximate not in (None, "none"):
            return f"nn.{self.module_class.__name__}(approximate={self.module_approximate!r})"
        return f"nn.{self.module_class.__name__}"

    def make_module(self, param: float) -> nn.Module:
        """The nn module computing this activation with ``param``."""
        if self.module_attr is not None:
            return self.module_class(**{self.module_attr: param})
        if self.module_approximate is not None:
            return self.module_class(approximate=self.module_approximate)
        return self.module_class()


# The functions are exactly what nn's modules call (F.relu for nn.ReLU, ...): the reference must
# equal its torch equivalent in value and derivative, at 0 and at a kink too (docs/spec.md §1.1).
# relu calls F.relu(z) with nothing else, so that a version-1 rollout is bit for bit what it was.
ACTIVATIONS: Dict[str, Activation] = {a.name: a for a in (
    Activation("relu", lambda z, p: F.relu(z), None, nn.ReLU, None),
    Activation("leaky_relu", lambda z, p: F.leaky_relu(z, p), 0.01, nn.LeakyReLU, "negative_slope"),
    Activation("elu", lambda z, p: F.elu(z, p), 1.0, nn.ELU, "alpha"),
    Activation("tanh", lambda z, p: torch.tanh(z), None, nn.Tanh, None),
    Activation("sigmoid", lambda z, p: torch.sigmoid(z), None, nn.Sigmoid, None),
    Activation("silu", lambda z, p: F.silu(z), None, nn.SiLU, None),
    Activation("gelu", lambda z, p: F.gelu(z), None, nn.GELU, None, "none"),
    Activation("gelu_tanh", lambda z, p: F.gelu(z, approximate="tanh"), None, nn.GELU, None, "tanh"),
    Activation("mish", lambda z, p: F.mish(z), None, nn.Mish, None),
)}
NAMES: Tuple[str, ...] = tuple(ACTIVATIONS)


class ResolvedActivation(NamedTuple):
    """What the operators take: the schema's name and its parameter (leaky_relu's negative
    slope, elu's alpha, 0.0 for the others). `resolve_activation` returns it and accepts it
    back unchanged, so that a module (FeedbackMLP) resolves once and passes the result on."""

    name: str
    param: float

    @property
    def fn(self) -> Callable[[Tensor], Tensor]:
        act, param = ACTIVATIONS[self.name].fn, self.param
        return lambda z: act(z, param)

    def describe(self) -> str:
        """``relu``, ``leaky_relu(negative_slope=0.2)``: how messages show it."""
        attr = ACTIVATIONS[self.name].module_attr
        return self.name if attr is None else f"{self.name}({attr}={self.param!r})"


# Each name resolved with its default parameter, built once.
_BY_NAME: Dict[str, ResolvedActivation] = {
    a.name: ResolvedActivation(a.name, a.default_param if a.default_param is not None else 0.0)
    for a in ACTIVATIONS.values()}


def supported() -> str:
    """The supported activations, for messages: names and the nn modules."""
    names = ", ".join(repr(n) for n in NAMES)
    modules = ", ".join(ACTIVATIONS[n].module_repr() for n in NAMES)
    return f"one of the names {names}, or an instance of {modules}"


def activation_of_module(module: nn.Module) -> Optional[Activation]:
    """The table row whose module class ``module`` is an instance of (subclasses included:
    callers that cannot verify the forward must check `overrides_forward`), else None."""
    for act in ACTIVATIONS.values():
        if isinstance(module, act.module_class):
            if act.module_approximate is None or getattr(module, "approximate", None) == act.module_approximate:
                return act
    return None


def activation_of_module_class(cls: type) -> Optional[Activation]:
    """The table row of an nn module class (the first match: GELU's two forms share one)."""
    for act in ACTIVATIONS.values():
        if issubclass(cls, act.module_class):
            return act
    return None


def overrides_forward(module: nn.Module, act: Activation) -> bool:
    return type(module).forward is not act.module_class.forward


def is_real(value) -> bool:
    """Whether ``value`` can be an activation parameter: numbers.Real takes Python and NumPy
    scalars; bool is a Real too, but True as a slope is a bug."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _param(who: str, owner: str, attr: str, value) -> float:
    if not is_real(value):
        raise TypeError(f"{who}: activation {owner}'s {attr} must be a real number (int or float), "
                        f"got {type(value).__name__} {value!r}")
    return float(value)


def resolve_activation(activation, who: str = "fbfast.rollout") -> ResolvedActivation:
    """``(name, param)`` of ``activation``: a name of the table (the default parameter), an
    instance of the matching ``nn`` module (its parameters honoured), or a `ResolvedActivation`.

    Raises ValueError for an unknown name or an nn.GELU with an unknown ``approximate``, and
    TypeError for anything else (another module, a module class instead of an instance, a
    subclass that overrides ``forward``, a parameter that is not a real number), each message
    listing what is supported.
    """
    if activation.__class__ is str:
        # The common case, once per rollout: a known name with its default parameter.
        resolved = _BY_NAME.get(activation)
        if resolved is not None:
            return resolved
    if isinstance(activation, ResolvedActivation):
        if activation.name in ACTIVATIONS and is_real(activation.param):
            return activation
        raise ValueError(f"{who}: activation {activation!r} is not a supported (name, parameter) pair; "
                         f"activation must be {supported()}")
    if isinstance(activation, str):
        act = ACTIVATIONS.get(activation)
        if act is None:
            hint = ""
            if activation.lower() in ACTIVATIONS:
                hint = f" (names are lower case: {activation.lower()!r})"
            raise ValueError(f"{who}: activation must be {supported()}; got the unknown name {activation!r}{hint}")
        return ResolvedActivation(act.name, act.default_param if act.default_param is not None else 0.0)
    if isinstance(activation, type) and issubclass(activation, nn.Module):
        act = activation_of_module_class(activation)
        fix = f"pass an instance, nn.{activation.__name__}(), or a name" if act else "see the supported list"
        raise TypeError(f"{who}: activation must be {supported()}; got the class {activation.__name__} "
                        f"itself, not an instance ({fix})")
    if isinstance(activation, nn.Module):
        kind = type(activation).__name__
        if isinstance(activation, nn.GELU) and getattr(activation, "approximate", None) not in ("none", "tanh"):
            raise ValueError(f"{who}: activation nn.GELU has approximate={activation.approximate!r}; "
                             "torch knows 'none' (exact, erf) and 'tanh'")
        act = activation_of_module(activation)
        if act is None:
            raise TypeError(f"{who}: activation must be {supported()}; got the module {kind} "
                            f"({activation!r}), which fbfast does not fuse")
        if overrides_forward(activation, act):
            raise TypeError(f"{who}: activation {kind} is a subclass of nn.{act.module_class.__name__} that "
                            f"overrides forward, so fbfast cannot tell what it computes; pass "
                            f"nn.{act.module_class.__name__} itself or the name {act.name!r}")
        if act.module_attr is None:
            return ResolvedActivation(act.name, 0.0)
        value = getattr(activation, act.module_attr)
        return ResolvedActivation(act.name, _param(who, kind, act.module_attr, value))
    raise TypeError(f"{who}: activation must be {supported()}; got {type(activation).__name__} {activation!r}")


# --- shape rules (docs/spec.md §1.1, §1.4) ----------------------------------------------------
#
# weights[l] is (out_l, in_l) like nn.Linear.weight, biases[l] is (out_l,) or None;
# in_1 = Du + O (columns [0, Du) read u_t, the rest the fed-back x_t), in_{l+1} = out_l, and
# out_L = O. The Python API takes them alternating, x0 first: rollout(x0, w1, b1, ..., wL, bL).


def weight_name(l: int) -> str:
    """``w1`` for layer index 0: how the API and every message name layer l's weight."""
    return f"w{l + 1}"


def bias_name(l: int) -> str:
    return f"b{l + 1}"


def param_names(layers: int) -> List[str]:
    """``["w1", "b1", ..., "wL", "bL"]``: the alternating order of the positional arguments."""
    return [n for l in range(layers) for n in (weight_name(l), bias_name(l))]


def interleave(weights: Sequence, biases: Sequence) -> List:
    """The alternating list ``[w1, b1, ..., wL, bL]``."""
    return [t for pair in zip(weights, biases) for t in pair]


def params_from_keywords(who: str, params: Sequence, keywords: dict) -> Sequence:
    """The alternating layers of a call that named them, ``rollout(x0, w1=..., b1=..., w2=...,
    b2=...)`` (version 1's signature allowed it), else ``params`` unchanged. Any other keyword is
    the TypeError Python gives for an unexpected keyword argument."""
    if not keywords:
        return params
    for name in keywords:
        kind, index = name[:1], name[1:]
        if kind not in ("w", "b") or not index.isdigit() or index.startswith("0"):
            raise TypeError(f"{who}() got an unexpected keyword argument {name!r}")
    if params:
        raise TypeError(f"{who}: got the layers both positionally and as keywords "
                        f"({', '.join(keywords)}); pass them one way")
    layers = max(int(name[1:]) for name in keywords)
    missing = [weight_name(l) for l in range(layers) if weight_name(l) not in keywords]
    if missing:
        raise TypeError(f"{who}: got {', '.join(keywords)} as keywords but not {', '.join(missing)}: "
                        "every layer needs its weight (a missing bias is None)")
    return [keywords.get(name) for name in param_names(layers)]
