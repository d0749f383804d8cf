"""`FeedbackMLP` and `from_module`: the network of docs/spec.md §1.1 as a module, rolled out fused."""

from __future__ import annotations

import copy
import inspect
import itertools
import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from ._spec import (ACTIVATIONS, NAMES, ResolvedActivation, activation_of_module, interleave, is_real,
                    resolve_activation, supported)
from ._validation import check_feedback_type, check_lags, check_residual
from .functional import rollout


def _check_size(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"FeedbackMLP: {name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"FeedbackMLP: {name} must be >= {minimum}, got {value}")
    return value


class EnsembleLinear(nn.Module):
    """``E`` linear layers side by side (docs/spec.md §1.3): ``weight`` ``(E, out, in)``, ``bias``
    ``(E, out)`` or None, each member initialised as ``nn.Linear`` initialises its own (uniform in
    ``±1/sqrt(in_features)``, the bound nn.Linear's kaiming-uniform with ``a = sqrt(5)`` gives).
    ``forward(x)``: ``x`` is ``(E, B, in)``, one row block per member, or ``(B, in)`` read by
    every member; returns ``(E, B, out)``."""

    def __init__(self, ensemble: int, in_features: int, out_features: int, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.ensemble, self.in_features, self.out_features = ensemble, in_features, out_features
        self.weight = nn.Parameter(torch.empty(ensemble, out_features, in_features, device=device, dtype=dtype))
        if bias:
            self.bias = nn.Parameter(torch.empty(ensemble, out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)  # as nn.Linear: fc.bias is None, not in the state_dict
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.init.kaiming_uniform_ would take fan_in from weight.shape[1] (out, for a 3-D
        # tensor): the bound is set from in_features directly, as nn.Linear's amounts to.
        bound = 1.0 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        wt = self.weight.transpose(1, 2)
        if x.dim() == 2:
            # Shared input: a zero-stride view per member, so its gradient is the members' sum.
            x = x.unsqueeze(0).expand(self.ensemble, *x.shape)
        if x.dim() != 3 or x.shape[0] != self.ensemble or x.shape[2] != self.in_features:
            raise ValueError(f"EnsembleLinear: x must be ({self.ensemble}, B, {self.in_features}) (E, B, in) or "
                             f"(B, {self.in_features}) shared by the E = {self.ensemble} members, got shape "
                             f"{tuple(x.shape)}")
        return torch.bmm(x, wt) if self.bias is None else torch.baddbmm(self.bias.unsqueeze(1), x, wt)

    def extra_repr(self) -> str:
        return (f"ensemble={self.ensemble}, in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


class FeedbackMLP(nn.Module):
    """``fcL(act(... act(fc1(x)) ...))`` whose output is fed back as (part of) its next input.

    ``L = hidden_layers + 1`` ``nn.Linear`` layers: ``fc1`` is ``Linear(in_features,
    hidden_features)``, ``fc2 .. fc{L-1}`` are ``Linear(hidden_features, hidden_features)`` and
    ``fcL`` is ``Linear(hidden_features, out_features)`` (with ``hidden_layers=0``, ``fc1`` alone
    is ``Linear(in_features, out_features)`` and ``hidden_features`` is not used).

    The feedback structure (docs/spec.md §1.2) is the module's: ``delay`` (an int, or a sequence
    of distinct positive lags ``d_1 .. d_m``), ``feedback`` (``F``: only the first ``F`` outputs
    are fed back; None: all ``out_features``) and ``residual`` (the first lag's fed-back value is
    added to the first ``F`` outputs). ``in_features = Du + m·F``: the first ``Du`` input
    features come from the exogenous input ``u``, then ``F`` per lag, in the order of ``delay``.
    The submodules are named ``fc1``, ``fc2``, ... so that with the defaults (one hidden layer,
    ReLU, one lag) the ``state_dict`` keys match the seed's network. ``activation`` is a name or
    an ``nn`` module (see `fbfast.rollout`); neither it nor the feedback structure holds
    parameters, so none of them is in the state_dict.

    ``ensemble=E`` makes ``E`` such networks rolled out side by side (docs/spec.md §1.3): each
    ``fcl`` is an `EnsembleLinear` holding ``weight`` ``(E, out, in)`` and ``bias`` ``(E, out)``
    under the same state_dict names; ``forward`` takes ``(E, B, in)`` or a shared ``(B, in)`` and
    returns ``(E, B, out)``, and ``rollout`` returns ``(T, E, B, O)``.
    """

    # Class-level defaults: a FeedbackMLP pickled whole before these attributes existed still
    # rolls out as the version-1 structure it was built with.
    delay: Union[int, Tuple[int, ...]] = 1
    feedback: Optional[int] = None
    residual: bool = False
    ensemble: Optional[int] = None

    def __init__(self, in_features: int, hidden_features: int, out_features: int, *,
                 hidden_layers: int = 1, activation="relu", residual: bool = False,
                 feedback: Optional[int] = None, delay: Union[int, Sequence[int]] = 1,
                 ensemble: Optional[int] = None, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        if ensemble is not None:
            _check_size("ensemble", ensemble, 1)
        _check_size("in_features", in_features, 0)
        _check_size("hidden_features", hidden_features, 0)
        _check_size("out_features", out_features, 0)
        _check_size("hidden_layers", hidden_layers, 0)
        self._set_feedback_structure("FeedbackMLP", out_features, delay, feedback, residual)
        fed_back = out_features if feedback is None else feedback
        fed = len(self.lags) * fed_back
        if in_features < fed:
            if len(self.lags) == 1 and feedback is None:
                raise ValueError(
                    f"FeedbackMLP: in_features ({in_features}) must be >= out_features ({out_features}): "
                    "the output is fed back into the last out_features inputs")
            raise ValueError(
                f"FeedbackMLP: in_features ({in_features}) must be >= m·F = {len(self.lags)}·{fed_back} = "
                f"{fed}: the last m·F inputs read the F = {fed_back} fed-back outputs at each of the "
                f"m = {len(self.lags)} lags {self.lags}")
        self._activation = resolve_activation(activation, who="FeedbackMLP")
        widths = [hidden_features] * hidden_layers + [out_features]
        fan_in = in_features
        for l, out in enumerate(widths):
            layer = (nn.Linear(fan_in, out, bias=bias, device=device, dtype=dtype) if ensemble is None else
                     EnsembleLinear(ensemble, fan_in, out, bias=bias, device=device, dtype=dtype))
            setattr(self, f"fc{l + 1}", layer)
            fan_in = out
        self.num_layers = len(widths)
        self.ensemble = ensemble

    def _set_feedback_structure(self, who: str, out_features: int, delay, feedback, residual) -> None:
        """Validate and store ``delay``, ``feedback`` and ``residual`` as `fbfast.rollout` checks
        them (fbfast/_validation.py), so that a bad structure fails here, not at the first rollout."""
        lags = check_lags(who, delay)
        if feedback is not None:
            check_feedback_type(who, feedback)
            if not 1 <= feedback <= out_features:
                raise ValueError(f"{who}: feedback must be in 1..out_features = {out_features}, got {feedback}")
        check_residual(who, residual)
        # The int form is kept as an int: a version-1 module rolls out with delay=k as before.
        self.delay = lags[0] if isinstance(delay, int) else lags
        self.feedback = feedback
        self.residual = residual

    @property
    def lags(self) -> Tuple[int, ...]:
        """``(d_1, ..., d_m)``: ``delay`` as a tuple."""
        return (self.delay,) if isinstance(self.delay, int) else tuple(self.delay)

    @property
    def fed_back(self) -> int:
        """``F``: how many of the first outputs are fed back."""
        return self.layers[-1].out_features if self.feedback is None else self.feedback

    @property
    def layers(self) -> List[Union[nn.Linear, EnsembleLinear]]:
        """``[fc1, ..., fcL]``."""
        return [getattr(self, f"fc{l + 1}") for l in range(self.num_layers)]

    @property
    def activation(self) -> str:
        """The activation's name (docs/spec.md §1.1)."""
        return self._activation.name

    @property
    def activation_param(self) -> float:
        """leaky_relu's negative slope, elu's alpha; 0.0 for the others."""
        return self._activation.param

    @property
    def exo_features(self) -> int:
        """``Du``: how many input features come from ``u`` rather than from the feedback."""
        return self.fc1.in_features - len(self.lags) * self.fed_back

    def params(self) -> List[Optional[Tensor]]:
        """``[fc1.weight, fc1.bias, ..., fcL.weight, fcL.bias]``: `fbfast.rollout`'s order."""
        layers = self.layers
        return interleave([fc.weight for fc in layers], [fc.bias for fc in layers])

    def forward(self, x: Tensor) -> Tensor:
        """The network ``f`` once: ``x`` is ``(..., in_features)`` = ``[u_t ; x_t]``. With
        ``residual=True`` a step's output is this plus the first lag's fed-back value
        (`rollout` adds it); ``forward`` stays the network, as ``from_module`` verifies it."""
        act = self._activation.fn
        last = self.num_layers - 1
        for l, fc in enumerate(self.layers):
            x = fc(x)
            if l < last:
                x = act(x)
        return x

    def rollout(self, x0: Tensor, steps: Optional[int] = None, u: Optional[Tensor] = None,
                delay: Union[int, Sequence[int], None] = None, truncate: Optional[int] = None,
                backend: str = "auto") -> Tensor:
        """The fused T-step rollout with the module's feedback structure; see `fbfast.rollout`
        for shapes and modes. ``delay`` overrides the module's lags for this call (version 1's
        modules took the delay here); None uses ``self.delay``."""
        return rollout(x0, *self.params(), steps=steps, u=u, delay=self.delay if delay is None else delay,
                       truncate=truncate, activation=self._activation, residual=self.residual,
                       feedback=self.feedback, backend=backend)

    def extra_repr(self) -> str:
        text = f"exo_features={self.exo_features}, activation={self._activation.describe()}"
        if self.delay != 1:
            text += f", delay={self.delay!r}"
        if self.feedback is not None:
            text += f", feedback={self.feedback}"
        if self.residual:
            text += ", residual=True"
        if self.ensemble is not None:
            text += f", ensemble={self.ensemble}"
        return text


def from_module(module: nn.Module, *, activation=None, **overrides) -> FeedbackMLP:
    """A `FeedbackMLP` view of an existing module computing the network of docs/spec.md §1.1, verified.

    Accepts an ``nn.Sequential(Linear, act, Linear, act, ..., Linear)`` with one supported
    activation class and the same parameters throughout (the activation is the Sequential's),
    or a module with ``nn.Linear`` attributes ``fc1 .. fcL`` (the seed's ``RecurrentNetwork``)
    whose forward computes ``fcL(act(... act(fc1(x))))`` with ``x = [u_t ; x_t]``: the
    exogenous features first, the fed-back output last. For such a module the activation is
    found by the verification below: the activation modules it holds (``self.act =
    nn.LeakyReLU(0.2)``) are tried first, then every supported activation with its default
    parameter; ``activation=`` (a name or an ``nn`` module) names it instead, for a forward that
    spells a parameter in code (``F.leaky_relu(x, 0.2)``). ``forward(x)`` takes the
    concatenation; ``forward(u, x)`` (either argument order, told apart by the parameter names)
    must concatenate ``[u, x]``. The view holds the very same ``nn.Linear`` objects, so
    parameters, optimizers and checkpoints of the original keep working. A ``FeedbackMLP``
    itself (exactly that type) is returned as it is, or, with overrides that change its feedback
    structure, as a new view of the same layers.

    ``overrides`` set the view's feedback structure (docs/spec.md §1.2): ``delay`` (an int or a
    sequence of distinct positive lags), ``feedback`` (``F``, or None for every output) and
    ``residual``; a FeedbackMLP's own structure, else ``delay=1, feedback=None,
    residual=False``, where not given. The input ``x = [u_t ; x_t]`` then has ``Du`` exogenous
    features and ``m·F`` fed-back ones (``m`` lags of ``F`` each). The forward is verified as one
    application of the network (the residual skip is the rollout's, not the module's).

    Verified on a probe input: a float64 deep copy of the module runs its own forward on a
    seeded 16-row probe, with its current weights and with random ones, in training and in eval
    mode, and must agree with the fused network to a relative 1e-10. The original module, its
    parameters, their ``.grad`` and the global RNG are left untouched. Anything else raises:

    * ``TypeError`` when the forward computes something else (another activation, an activation
      on the output, the columns as ``[x, u]``, dropout, ...; the message says what was found
      where it can tell), when the module has parameters outside ``fc1 .. fcL`` (they would
      never get a gradient through the view) or reads buffers that change its output, when a
      Sequential mixes activations or holds one fbfast does not fuse, and when the forward
      cannot be run on the probe or returns something other than one tensor of the output's shape;
    * ``ValueError`` for sizes that do not chain or cannot feed back, and for parameters on the
      meta device or still uninitialized (lazy modules).
    """
    ensembles = [name for name, m in module.named_modules() if isinstance(m, EnsembleLinear)]
    if ensembles:
        # Its verification probes a 2-D forward and views nn.Linear layers (see _verify_forward).
        raise TypeError(f"fbfast.from_module: {type(module).__name__} holds ensemble layers (EnsembleLinear "
                        f"{ensembles[0]!r}); from_module does not view ensembles yet: roll a "
                        "FeedbackMLP(..., ensemble=E) out with its own .rollout, or pass its 3-D weights to "
                        "fbfast.rollout")
    override = None if activation is None else resolve_activation(activation, who="fbfast.from_module")
    unknown = [k for k in overrides if k not in _STRUCTURE]
    if unknown:
        raise TypeError(f"fbfast.from_module() got an unexpected keyword argument {unknown[0]!r} (it takes "
                        f"activation and the feedback structure: {', '.join(_STRUCTURE)})")
    structure = {k: getattr(module, k) if isinstance(module, FeedbackMLP) else default
                 for k, default in _STRUCTURE.items()}
    structure.update(overrides)
    linears, declared = _linears(module)
    view = FeedbackMLP.__new__(FeedbackMLP)
    nn.Module.__init__(view)
    if type(module) is FeedbackMLP:
        # Its forward is the fused network by construction; a subclass may override it.
        if override is not None and _key(override) != _key(module._activation):
            raise TypeError(f"fbfast.from_module: the FeedbackMLP computes {module._activation.describe()}, "
                            f"but activation={override.describe()} was asked for")
        view._set_feedback_structure("fbfast.from_module", linears[-1].out_features, **structure)
        fed = linears[-1].out_features if view.feedback is None else view.feedback
        if (view.lags, fed, view.residual) == (module.lags, module.fed_back, module.residual):
            return module
        _check_sizes(linears, view)
        return _view(view, linears, module._activation)  # the same, verified, network
    if isinstance(module, FeedbackMLP):
        declared = module._activation  # a subclass: its forward must still compute its activation
    _check_materialized(module)
    view._set_feedback_structure("fbfast.from_module", linears[-1].out_features, **structure)
    _check_sizes(linears, view)
    if override is not None and declared is not None and _key(override) != _key(declared):
        whose = "the Sequential's activation modules say" if isinstance(module, nn.Sequential) else \
            f"the {type(module).__name__}'s activation attribute says"
        raise TypeError(f"fbfast.from_module: {whose} {declared.describe()}, but activation="
                        f"{override.describe()} was asked for")
    _check_no_foreign_parameters(module, linears, declared or override)
    candidates = [override] if override else [declared] if declared else _candidates(module)
    fed = linears[-1].out_features if view.feedback is None else view.feedback
    chosen = _verify_forward(module, candidates, fed=len(view.lags) * fed)
    return _view(view, linears, chosen)


# from_module's feedback-structure overrides and their defaults (FeedbackMLP's).
_STRUCTURE = {"delay": 1, "feedback": None, "residual": False}


def _view(view: FeedbackMLP, linears: Sequence[nn.Linear], act: ResolvedActivation) -> FeedbackMLP:
    for l, fc in enumerate(linears):
        setattr(view, f"fc{l + 1}", fc)
    view.num_layers = len(linears)
    view._activation = act
    return view


# --- from_module's checks ------------------------------------------------------------------------

_SUPPORTED = (
    "fbfast fuses exactly fcL(act(... act(fc1(x)))) with x = [u_t ; x_t] (exogenous features first, "
    f"the fed-back output last) and one activation act among {', '.join(NAMES)}; from_module accepts "
    "nn.Sequential(Linear, act, Linear, ..., act, Linear) or a module with nn.Linear attributes "
    "fc1 .. fcL and no other parameters whose forward(x) computes it, or whose forward(u, x) computes "
    "it on torch.cat([u, x], -1). For any other network keep the per-step loop")

# The probe: enough rows, and entries large enough, that fc1's pre-activations fall on both sides
# of 0 in every hidden unit, so ReLU is told apart from the identity, LeakyReLU, ELU, ...
_PROBE_ROWS = 16
_PROBE_SCALE = 3.0
_PROBE_SEED = 20240917
_RTOL = 1e-10  # float64: only summation order may differ between the forward and the fused formula
_MAX_BUFFER_PROBES = 16

# Names of forward(a, b)'s parameters that say which one is the exogenous input u and which the
# fed-back x; matched against the name's "_"-separated parts (u_t, x_prev, prev_output, ...).
_U_WORDS = frozenset({"u", "ut", "inp", "input", "inputs", "exo", "exog", "exogenous", "control",
                      "controls", "ctrl", "action", "actions", "drive", "forcing", "external",
                      "ext", "cmd", "command"})
_X_WORDS = frozenset({"x", "xt", "y", "yt", "state", "states", "prev", "previous", "feedback", "fb",
                      "h", "hidden", "out", "output", "outputs", "last", "s", "fed"})

# Variants tried when the forward does not match, to name what differs: the candidates and every
# supported activation (a module whose activation modules say one thing and whose forward does
# another), then these: no activation, and a few that fbfast does not fuse. (label, function).
_UNFUSED = [(None, lambda t: t), ("softplus", F.softplus), ("relu6", F.relu6), ("hardtanh", F.hardtanh),
            ("softsign", F.softsign)]
_OUTPUT = [(None, lambda t: t), ("tanh", torch.tanh), ("sigmoid", torch.sigmoid), ("relu", F.relu)]


def _key(act: ResolvedActivation) -> Tuple[str, str]:
    # float.hex: a NaN parameter equals itself here, as it does for the compile cache.
    return act.name, float(act.param).hex()


def _network_expr(layers: int, act: str, x: str = "x", outer: Optional[str] = None) -> str:
    """``fc2(relu(fc1(x)))``: how messages write the network."""
    expr = f"fc1({x})"
    for l in range(1, layers):
        expr = f"fc{l + 1}({expr})" if act is None else f"fc{l + 1}({act}({expr}))"
    return expr if outer is None else f"{outer}({expr})"


def _fc_names(layers: int) -> str:
    return "fc1" if layers == 1 else "fc1 and fc2" if layers == 2 else f"fc1 .. fc{layers}"


def _sequential_activation(module: nn.Sequential, layers: list) -> Optional[ResolvedActivation]:
    """The one activation between the Sequential's Linear layers, else TypeError."""
    kinds = ", ".join(type(m).__name__ for m in layers)
    found = []
    for i, m in enumerate(layers[1::2]):
        row = activation_of_module(m)
        if row is None:
            raise TypeError(
                f"fbfast.from_module: Sequential({kinds}) holds {type(m).__name__} at position {2 * i + 1}, "
                f"an activation fbfast does not fuse; the activation must be {supported()}")
        param = 0.0
        if row.module_attr is not None:
            value = getattr(m, row.module_attr)
            if not is_real(value):
                raise TypeError(f"fbfast.from_module: Sequential({kinds}) holds {m!r} at position {2 * i + 1}, "
                                f"whose {row.module_attr} is {type(value).__name__} {value!r}, not a real number")
            param = float(value)
        found.append((2 * i + 1, m, ResolvedActivation(row.name, param)))
    if not found:
        return None
    first = found[0]
    for position, m, act in found[1:]:
        if _key(act) != _key(first[2]):
            raise TypeError(
                f"fbfast.from_module: Sequential({kinds}) mixes activations: position {first[0]} is {first[1]!r} "
                f"({first[2].describe()}), position {position} is {m!r} ({act.describe()}); fbfast applies "
                "one activation, with one parameter, after every layer but the last")
    return first[2]


def _linears(module: nn.Module) -> Tuple[List[nn.Linear], Optional[ResolvedActivation]]:
    """``([fc1, ..., fcL], activation)`` of a module from_module knows how to view, else
    TypeError; the activation is the Sequential's (None for a module with fc attributes,
    whose forward says what it is)."""
    if isinstance(module, nn.Sequential):
        layers = list(module)
        if len(layers) % 2 == 0 or not all(isinstance(m, nn.Linear) for m in layers[0::2]):
            kinds = ", ".join(type(m).__name__ for m in layers)
            raise TypeError(
                f"fbfast.from_module: needs nn.Sequential(Linear, act, Linear, ..., act, Linear), Linear layers "
                f"with one activation module between each two, got Sequential({kinds})")
        return layers[0::2], _sequential_activation(module, layers)
    linears = []
    while isinstance(getattr(module, f"fc{len(linears) + 1}", None), nn.Linear):
        linears.append(getattr(module, f"fc{len(linears) + 1}"))
    if not linears:
        raise TypeError(
            f"fbfast.from_module: {type(module).__name__} has no nn.Linear attributes fc1, fc2, ..., fcL "
            "and is not nn.Sequential(Linear, act, Linear, ..., act, Linear)")
    return linears, None


def _check_sizes(linears: Sequence[nn.Linear], view: FeedbackMLP) -> None:
    def show(l):
        return f"fc{l + 1} is Linear({linears[l].in_features}, {linears[l].out_features})"

    for l in range(1, len(linears)):
        if linears[l].in_features != linears[l - 1].out_features:
            raise ValueError(
                f"fbfast.from_module: {show(l - 1)} and {show(l)}; need fc{l}.out == fc{l + 1}.in "
                "(layer sizes must chain)")
    first, last = linears[0], linears[-1]
    m, fed = len(view.lags), last.out_features if view.feedback is None else view.feedback
    if first.in_features < m * fed:
        shown = show(0) if len(linears) == 1 else f"{show(0)} and {show(len(linears) - 1)}"
        if m == 1 and view.feedback is None:
            raise ValueError(
                f"fbfast.from_module: {shown}; need fc1.in >= fc{len(linears)}.out (the output is fed back "
                f"into the last fc{len(linears)}.out inputs)")
        raise ValueError(
            f"fbfast.from_module: {shown}; need fc1.in >= m·F = {m}·{fed} = {m * fed} (the F = {fed} "
            f"fed-back outputs at each of the m = {m} lags {view.lags} are the last m·F inputs)")


def _candidates(module: nn.Module) -> List[ResolvedActivation]:
    """The activations a module with fc attributes may compute, in the order tried: those of
    the activation modules it holds (their parameters as set), then every supported one with
    its default parameter."""
    out: List[ResolvedActivation] = []
    for m in module.modules():
        row = activation_of_module(m)
        if row is None:
            continue
        value = getattr(m, row.module_attr) if row.module_attr else 0.0
        if not is_real(value):
            continue  # cannot be what the forward computes with; the defaults are still tried
        out.append(ResolvedActivation(row.name, float(value)))
    out += [ResolvedActivation(n, ACTIVATIONS[n].default_param or 0.0) for n in NAMES]
    unique: Dict[Tuple[str, str], ResolvedActivation] = {}
    for act in out:
        unique.setdefault(_key(act), act)
    return list(unique.values())


def _check_materialized(module: nn.Module) -> None:
    """Lazy and meta tensors have no values to verify (or to roll out): say so before anything
    reads their sizes (an uninitialized nn.LazyLinear reports in_features = 0)."""
    for name, t in itertools.chain(module.named_parameters(), module.named_buffers()):
        if is_lazy(t):
            raise ValueError(
                f"fbfast.from_module: {type(module).__name__}.{name} is not initialized yet (a lazy "
                "module such as nn.LazyLinear); run one forward pass first, or build it with nn.Linear")
        if t.device.type == "meta":
            raise ValueError(
                f"fbfast.from_module: {type(module).__name__}.{name} is on the meta device and has "
                "no values; materialize the module first (module.to_empty(device=...), then "
                "initialize or load its weights)")


def _short_repr(m: nn.Module) -> str:
    text = repr(m)
    return text if "\n" not in text else f"{type(m).__name__}(...)"


def _check_no_foreign_parameters(module: nn.Module, linears: Sequence[nn.Linear],
                                 act: Optional[ResolvedActivation]) -> None:
    """The view holds only fc1 .. fcL, so any other parameter is one the view ignores. Refused
    whatever its value: a parameter that is inert now (a zero-initialized gate, an unused layer)
    would not stay inert under training, and it would never get a gradient from the rollout."""
    own = {id(p) for m in linears for p in m.parameters()}
    owners: Dict[str, str] = {}
    for name, p in module.named_parameters():
        if id(p) in own:
            continue
        prefix = name.rpartition(".")[0]
        if prefix:
            owners.setdefault(prefix, f"{prefix} ({_short_repr(module.get_submodule(prefix))})")
        else:
            owners[name] = f"{name} (a Parameter of shape {tuple(p.shape)})"
    if owners:
        listed = ", ".join(owners.values())
        verb = "is" if len(owners) == 1 else "are"
        it = "it" if len(owners) == 1 else "they"
        expr = _network_expr(len(linears), act.name if act else "act")
        raise TypeError(
            f"fbfast.from_module: {type(module).__name__} has parameters outside {_fc_names(len(linears))}: "
            f"{listed} {verb} not part of the fused network, which is {expr}; {it} would never get "
            f"a gradient. {_SUPPORTED}")


def _word_role(name: str) -> Optional[str]:
    parts = {p for p in name.lower().split("_") if p}
    is_u, is_x = bool(parts & _U_WORDS), bool(parts & _X_WORDS)
    return "u" if is_u and not is_x else "x" if is_x and not is_u else None


def _calling_convention(module: nn.Module):
    """``(names, order, named)``: the forward's required positional parameters (one or two),
    which of u/x each takes, and whether the names said so (else fbfast's own order, u first)."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):  # a builtin or scripted forward: call it with the one tensor
        return ["x"], ("x",), True
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p.name for p in params if p.kind in positional and p.default is p.empty]
    keyword = [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is p.empty]
    varargs = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)
    if keyword or len(required) > 2 or (not required and not varargs):
        shown = ", ".join(required + [f"*, {k}" for k in keyword])
        raise TypeError(
            f"fbfast.from_module: could not verify {type(module).__name__}: its forward({shown}) is "
            f"neither forward(x) nor forward(u, x). {_SUPPORTED}")
    if len(required) < 2:
        return (required or ["x"]), ("x",), True
    first, second = (_word_role(n) for n in required)
    says_u_first = first == "u" or second == "x"
    says_x_first = first == "x" or second == "u"
    if says_x_first and not says_u_first:
        return required, ("x", "u"), True
    return required, ("u", "x"), says_u_first and not says_x_first


def _weights(linears: Sequence[nn.Linear]) -> List[Tuple[Tensor, Optional[Tensor]]]:
    """What the view's rollout reads: the layers' weight/bias attributes, not fc1(...), because
    the rollout never runs the layers' forward or their hooks. Snapshot copies, so that a
    forward that changes the copy's layers cannot change what it is compared with."""
    return [(fc.weight.detach().clone(), None if fc.bias is None else fc.bias.detach().clone())
            for fc in linears]


def _fused(weights, inp: Tensor, hidden) -> Tensor:
    """One step of the network the view rolls out (fbfast/reference.py)."""
    last = len(weights) - 1
    for l, (w, b) in enumerate(weights):
        inp = F.linear(inp, w, b)
        if l < last:
            inp = hidden(inp)
    return inp


def _verify_forward(module: nn.Module, candidates: List[ResolvedActivation], fed: int) -> ResolvedActivation:
    """Run the module's own forward on a probe and compare it with the fused network for each
    candidate activation; return the first candidate that matches in every case, or raise a
    TypeError that says what differs. Works on a float64 deep copy, so the original
    (parameters, .grad, training flags, optimizer state) is never touched."""
    name = type(module).__name__
    names, order, named = _calling_convention(module)
    try:
        twin = copy.deepcopy(module).to(torch.float64)
    except Exception as exc:
        raise TypeError(
            f"fbfast.from_module: could not verify {name}: it could not be deep-copied and converted "
            f"to float64 to run its forward on a probe ({type(exc).__name__}: {exc}). {_SUPPORTED}") from exc
    linears, _ = _linears(twin)
    L = len(linears)
    # The last `fed` = m·F inputs are the fed-back ones: forward(u, x) gets them as x.
    du, features = linears[0].in_features - fed, linears[0].in_features
    gen = torch.Generator().manual_seed(_PROBE_SEED)
    probe = torch.randn(_PROBE_ROWS, features, generator=gen, dtype=torch.float64) * _PROBE_SCALE
    probe = probe.to(linears[0].weight.device)
    parts = {"u": probe[:, :du], "x": probe[:, du:]}
    two = len(order) == 2
    args = [parts[r] for r in order] if two else [probe]
    if two:
        call = (f"forward({names[0]}={order[0]}_t, {names[1]}={order[1]}_t) with u_t of shape "
                f"{tuple(parts['u'].shape)} and x_t of shape {tuple(parts['x'].shape)}")
        if not named:
            call += (f" (the names {names[0]!r}, {names[1]!r} do not say which is the exogenous input, "
                     "so fbfast assumed its own order, u first)")
    else:
        call = f"its forward on a probe of shape {tuple(probe.shape)}"
    remaining = list(candidates)

    def check(case: str) -> None:
        # Narrows `remaining` to the candidates that match in this case too. The fused outputs
        # first: a weight that a forward pre-hook recomputes (old-style spectral_norm) must be
        # read as the view would read it, before the forward refreshes it.
        nonlocal remaining
        weights = _weights(linears)
        expr = _network_expr(L, remaining[0].name)
        try:
            expected = [_fused(weights, probe, act.fn) for act in remaining]
        except Exception as exc:  # weights that are not the layers' parameters (old-style spectral_norm)
            raise TypeError(
                f"fbfast.from_module: could not verify {name}: {_fc_names(L)} cannot be applied to a float64 "
                f"probe the way the rollout applies them, F.linear on their weight and bias "
                f"({type(exc).__name__}: {exc}). {_SUPPORTED}") from exc
        try:
            got = twin(*args)
        except Exception as exc:
            raise TypeError(
                f"fbfast.from_module: could not verify that {name} computes {expr}: calling "
                f"{call} in float64 {case} raised {type(exc).__name__}: {exc}. {_SUPPORTED}") from exc
        if not isinstance(got, Tensor):
            what = f"a tuple of {len(got)}" if isinstance(got, tuple) else type(got).__name__
            raise TypeError(
                f"fbfast.from_module: could not verify {name}: {call} returned {what}, not one tensor "
                f"of shape {tuple(expected[0].shape)}. {_SUPPORTED}")
        if got.shape != expected[0].shape:
            raise TypeError(
                f"fbfast.from_module: could not verify {name}: {call} returned shape {tuple(got.shape)}, "
                f"but {expr} has shape {tuple(expected[0].shape)}. {_SUPPORTED}")
        values = got.to(torch.float64)
        errors = [(values - e).abs().max().item() if e.numel() else 0.0 for e in expected]
        tols = [_RTOL * (1.0 + (e.abs().max().item() if e.numel() else 0.0)) for e in expected]
        matching = [act for act, err, tol in zip(remaining, errors, tols) if err <= tol]  # NaN: no match
        if not matching:
            raise TypeError(_mismatch_message(module, got, errors[0], tols[0], case, call, weights, parts,
                                              two, remaining, candidates))
        remaining = matching

    accelerators = sorted({t.device.index for t in itertools.chain(twin.parameters(), twin.buffers())
                           if t.device.type == "cuda"})
    flags = {m: m.training for m in twin.modules()}
    other = "eval" if module.training else "training"
    # fork_rng: a dropout in the copy's forward must not advance the caller's RNG.
    with torch.no_grad(), torch.random.fork_rng(devices=accelerators, device_type="cuda"):
        for weights in ("with its own weights",
                        f"with random weights in {_fc_names(L)} (the form must match, not only the current values)"):
            if weights.startswith("with random"):
                # Current values can hide a difference (a zero-initialized fc2 makes every
                # activation look alike); the copy's weights are ours to overwrite.
                for p in itertools.chain.from_iterable(fc.parameters() for fc in linears):
                    r = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.device)
                    p.copy_(r / math.sqrt(p.shape[-1]) if p.dim() >= 2 else r)
            for m, training in flags.items():
                m.training = training
            check(weights)
            # The view has no train/eval distinction: a forward that changes with the mode
            # (dropout, batch norm) computes something else in one of them.
            twin.train(not module.training)
            check(f"{weights}, in {other} mode")
        for m, training in flags.items():
            m.training = training
        _check_buffers(module, twin, linears, check, remaining[0])
    return remaining[0]


def _check_buffers(module: nn.Module, twin: nn.Module, linears: Sequence[nn.Linear], check,
                   act: ResolvedActivation) -> None:
    """Buffers outside fc1 .. fcL that the forward reads (an input normalization's mean and
    std) would be ignored by the view: perturb each in the copy and refuse if the output moves."""
    own = {id(b) for m in linears for b in m.buffers()}
    foreign = [(n, b) for n, b in twin.named_buffers()
               if id(b) not in own and b.is_floating_point() and b.numel() > 0]
    if not foreign:
        return
    groups = [[item] for item in foreign] if len(foreign) <= _MAX_BUFFER_PROBES else [foreign]
    gen = torch.Generator().manual_seed(_PROBE_SEED + 1)
    read = []
    for group in groups:
        saved = [b.clone() for _, b in group]
        for _, b in group:
            # Positive shifts keep variances and scales valid.
            b.add_(0.5 + torch.rand(b.shape, generator=gen, dtype=torch.float64).to(b.device, b.dtype))
        try:
            check("with a buffer changed")
        except TypeError:
            read += [n for n, _ in group]
        for (_, b), s in zip(group, saved):
            b.copy_(s)
    if read:
        raise TypeError(
            f"fbfast.from_module: {type(module).__name__}'s forward reads buffers outside {_fc_names(len(linears))} "
            f"({', '.join(read)}): its output changes when they do, but they are not part of the "
            f"fused network {_network_expr(len(linears), act.name)}, and the view would ignore them. {_SUPPORTED}")


def _mismatch_message(module: nn.Module, got: Tensor, err: float, tol: float, case: str, call: str,
                      weights, parts: Dict[str, Tensor], two: bool, remaining: List[ResolvedActivation],
                      candidates: List[ResolvedActivation]) -> str:
    """Say by how much the forward differs and, where one of a few common variants reproduces
    it, which (the variants cost one 16-row forward each)."""
    L = len(weights)
    du, o = parts["u"].shape[-1], parts["x"].shape[-1]
    if len(remaining) == 1:
        what = f"{_network_expr(L, remaining[0].name)} with x = [u_t ; x_t]"
        if ACTIVATIONS[remaining[0].name].module_attr:
            what += f" ({remaining[0].describe()})"
        nearest = "the fused network"
    else:
        what = (f"{_network_expr(L, 'act')} with x = [u_t ; x_t] for any activation act fbfast fuses "
                f"({', '.join(a.describe() for a in remaining)})")
        nearest = f"the fused network with {remaining[0].describe()}"
    msg = (f"fbfast.from_module: {type(module).__name__}'s forward does not compute {what}: {call} in "
           f"float64 {case} differs from {nearest} by up to {err:.3g}")
    if got.dtype != torch.float64:
        msg += f" (it returned {got.dtype} for float64 input: does the forward cast?)"
    values = got.to(torch.float64)
    orders = [("u", "x"), ("x", "u")] if two else [("u", "x")]
    compared = {_key(a) for a in remaining}
    supported_ones = {_key(a): a for a in candidates + [ResolvedActivation(n, ACTIVATIONS[n].default_param or 0.0)
                                                       for n in NAMES]}
    hidden_variants = [(a.name, a.fn, k) for k, a in supported_ones.items()] + [(n, f, None) for n, f in _UNFUSED]
    found = None
    for order in orders:
        inp = torch.cat([parts[r] for r in order], -1)
        for hidden, act, key in hidden_variants:
            h = _fused(weights, inp, act)
            for outer, out_act in _OUTPUT:
                if order == ("u", "x") and outer is None and key in compared:
                    continue  # what was compared above
                if (out_act(h) - values).abs().max().item() <= tol:
                    found = (order, hidden, outer)
                    break
            if found:
                break
        if found:
            break
    expected = remaining[0].name if len(remaining) == 1 else None
    if found:
        order, hidden, outer = found
        x_expr = f"cat([{order[0]}, {order[1]}])" if two else "x"
        expr = _network_expr(L, hidden, x_expr, outer)
        what = []
        if L > 1 and hidden is None:
            what.append("it has no activation between the layers, but fbfast applies one after every layer "
                        "but the last")
        elif L > 1 and hidden not in ACTIVATIONS:
            what.append(f"its hidden activation is {hidden}, which fbfast does not fuse (it fuses "
                        f"{', '.join(NAMES)})")
        elif L > 1 and expected is not None and hidden != expected:
            if isinstance(module, nn.Sequential):
                kinds = sorted({type(m).__name__ for m in list(module)[1::2]})
                source = f"its activation modules ({', '.join(kinds)}) say"
            elif isinstance(module, FeedbackMLP):
                source = "its activation attribute says"
            elif len(candidates) == 1:
                source = "activation= asks for"
            else:
                source = "the cases before matched only"
            what.append(f"its hidden activation is {hidden}, but {source} {expected}")
        if outer is not None:
            what.append(f"it applies {outer} to the output, while fbfast feeds fc{L}'s output back as "
                        "it is (no output activation)")
        if order == ("x", "u"):
            what.append(
                f"wrong column order: it concatenates [x, u], but fbfast's fc1 reads [u_t ; x_t], "
                f"columns [0:{du}] of fc1.weight reading u and columns [{du}:] the fed-back x "
                "(fbfast/reference.py). Write the forward with torch.cat([u, x], -1); to keep weights "
                "trained the old way, also permute fc1's columns once: with torch.no_grad(): "
                f"fc1.weight.copy_(torch.cat([fc1.weight[:, {o}:], fc1.weight[:, :{o}]], 1))")
        msg += f". Its forward matches {expr}" + (": " + "; ".join(what) if what else "")
    else:
        labels = ", ".join(dict.fromkeys("none" if label is None else label for label, _, _ in hidden_variants))
        msg += (f". None of the variants fbfast tried matches it (the same hidden activation after every "
                f"layer but the last, among {labels}; tanh, sigmoid or relu on the output"
                f"{'; the columns as [x, u]' if two else ''}). A leaky_relu or elu whose parameter the "
                "forward spells in code (F.leaky_relu(x, 0.2)) is found only when the module holds it as "
                "an nn module or from_module(module, activation=nn.LeakyReLU(0.2)) names it")
        skip = {id(m) for lin in _linears(module)[0] for m in lin.modules()}
        others = [f"{n} ({_short_repr(m)})" for n, m in module.named_modules()
                  if n and id(m) not in skip and activation_of_module(m) is None]
        if others:
            msg += f"; besides {_fc_names(L)} it has {', '.join(others)}"
    return f"{msg}. {_SUPPORTED}"
