"""`FeedbackMLP` and `from_module`: the network of the seed's training loops, rolled out fused."""

from __future__ import annotations

import copy
import inspect
import itertools
import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

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
    """A `FeedbackMLP` view of an existing ``Linear -> ReLU -> Linear`` module, verified.

    Accepts an ``nn.Sequential(Linear, ReLU, Linear)`` or a module with ``fc1``/``fc2``
    ``nn.Linear`` attributes (the seed's ``RecurrentNetwork``) whose forward computes
    ``fc2(relu(fc1(x)))`` with ``x = [u_t ; x_t]``: the exogenous features first, the fed-back
    output last. ``forward(x)`` takes that concatenation; ``forward(u, x)`` (either argument
    order, told apart by the parameter names) must concatenate ``[u, x]``. The view holds the
    very same ``nn.Linear`` objects, so parameters, optimizers and checkpoints of the original
    keep working. A ``FeedbackMLP`` itself (exactly that type) is returned as it is.

    Verified on a probe input: a float64 deep copy of the module runs its own forward on a
    seeded 16-row probe, with its current weights and with random ones, in training and in eval
    mode, and must agree with the fused network to a relative 1e-10. The original module, its
    parameters, their ``.grad`` and the global RNG are left untouched. Anything else raises:

    * ``TypeError`` when the forward computes something else (a different activation, an
      activation on the output, the columns as ``[x, u]``, dropout, ...; the message says what
      was found where it can tell), when the module has parameters outside ``fc1``/``fc2``
      (they would never get a gradient through the view) or reads buffers that change its
      output, and when the forward cannot be run on the probe or returns something other than
      one tensor of the output's shape;
    * ``ValueError`` for sizes that cannot feed back, and for parameters on the meta device or
      still uninitialized (lazy modules).
    """
    if type(module) is FeedbackMLP:
        return module  # its forward is the fused network by construction; a subclass may override it
    fc1, fc2 = _linears(module)
    _check_materialized(module)
    if fc1.out_features != fc2.in_features or fc1.in_features < fc2.out_features:
        raise ValueError(
            f"fbfast.from_module: fc1 is Linear({fc1.in_features}, {fc1.out_features}) and fc2 is "
            f"Linear({fc2.in_features}, {fc2.out_features}); need fc1.out == fc2.in and "
            "fc1.in >= fc2.out (the output is fed back into the last fc2.out inputs)")
    _check_no_foreign_parameters(module, fc1, fc2)
    _verify_forward(module)
    view = FeedbackMLP.__new__(FeedbackMLP)
    nn.Module.__init__(view)
    view.fc1, view.fc2 = fc1, fc2
    return view


# --- from_module's checks ------------------------------------------------------------------------

_SUPPORTED = (
    "fbfast fuses exactly fc2(relu(fc1(x))) with x = [u_t ; x_t] (exogenous features first, the "
    "fed-back output last); from_module accepts nn.Sequential(Linear, ReLU, Linear) or a module "
    "with nn.Linear attributes fc1/fc2 and no other parameters whose forward(x) computes it, or "
    "whose forward(u, x) computes it on torch.cat([u, x], -1). For any other network keep the "
    "per-step loop")

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

# Variants tried when the forward does not match, to name what differs: (label, function).
_HIDDEN = [("relu", F.relu), (None, lambda t: t), ("tanh", torch.tanh), ("sigmoid", torch.sigmoid),
           ("SiLU", F.silu), ("GELU", F.gelu),
           ("GELU(approximate='tanh')", lambda t: F.gelu(t, approximate="tanh")),
           ("LeakyReLU", F.leaky_relu), ("ELU", F.elu), ("Softplus", F.softplus)]
_OUTPUT = [(None, lambda t: t), ("tanh", torch.tanh), ("sigmoid", torch.sigmoid), ("relu", F.relu)]


def _linears(module: nn.Module):
    """``(fc1, fc2)`` of a module from_module knows how to view, else TypeError."""
    if isinstance(module, nn.Sequential):
        layers = list(module)
        if not (len(layers) == 3 and isinstance(layers[0], nn.Linear)
                and isinstance(layers[1], nn.ReLU) and isinstance(layers[2], nn.Linear)):
            kinds = ", ".join(type(m).__name__ for m in layers)
            raise TypeError(f"fbfast.from_module: needs nn.Sequential(Linear, ReLU, Linear), got Sequential({kinds})")
        return layers[0], layers[2]
    fc1, fc2 = getattr(module, "fc1", None), getattr(module, "fc2", None)
    if not (isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear)):
        raise TypeError(
            f"fbfast.from_module: {type(module).__name__} has no nn.Linear attributes fc1 and fc2 "
            "and is not nn.Sequential(Linear, ReLU, Linear)")
    return fc1, fc2


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


def _check_no_foreign_parameters(module: nn.Module, fc1: nn.Linear, fc2: nn.Linear) -> None:
    """The view holds only fc1 and fc2, so any other parameter is one the view ignores. Refused
    whatever its value: a parameter that is inert now (a zero-initialized gate, an unused layer)
    would not stay inert under training, and it would never get a gradient from the rollout."""
    own = {id(p) for m in (fc1, fc2) for p in m.parameters()}
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
        raise TypeError(
            f"fbfast.from_module: {type(module).__name__} has parameters outside fc1 and fc2: {listed} "
            f"{verb} not part of the fused network, which is fc2(relu(fc1(x))); {it} would never get "
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


def _weights(fc1: nn.Linear, fc2: nn.Linear) -> Tuple[Tensor, Optional[Tensor], Tensor, Optional[Tensor]]:
    """What the view's rollout reads: the layers' weight/bias attributes, not fc1(...)/fc2(...),
    because the rollout never runs the layers' forward or their hooks. Snapshot copies, so that
    a forward that changes the copy's layers cannot change what it is compared with."""
    return tuple(None if t is None else t.detach().clone()
                 for t in (fc1.weight, fc1.bias, fc2.weight, fc2.bias))


def _fused(weights, inp: Tensor, hidden=F.relu) -> Tensor:
    """One step of the network the view rolls out (fbfast/reference.py)."""
    w1, b1, w2, b2 = weights
    return F.linear(hidden(F.linear(inp, w1, b1)), w2, b2)


def _verify_forward(module: nn.Module) -> None:
    """Run the module's own forward on a probe and compare it with the fused network; raise a
    TypeError that says what differs. Works on a float64 deep copy, so the original (parameters,
    .grad, training flags, optimizer state) is never touched."""
    name = type(module).__name__
    names, order, named = _calling_convention(module)
    try:
        twin = copy.deepcopy(module).to(torch.float64)
    except Exception as exc:
        raise TypeError(
            f"fbfast.from_module: could not verify {name}: it could not be deep-copied and converted "
            f"to float64 to run its forward on a probe ({type(exc).__name__}: {exc}). {_SUPPORTED}") from exc
    fc1, fc2 = _linears(twin)
    du, features = fc1.in_features - fc2.out_features, fc1.in_features
    gen = torch.Generator().manual_seed(_PROBE_SEED)
    probe = torch.randn(_PROBE_ROWS, features, generator=gen, dtype=torch.float64) * _PROBE_SCALE
    probe = probe.to(fc1.weight.device)
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

    def check(case: str) -> None:
        # The fused output first: a weight that a forward pre-hook recomputes (old-style
        # spectral_norm) must be read as the view would read it, before the forward refreshes it.
        weights = _weights(fc1, fc2)
        try:
            expected = _fused(weights, probe)
        except Exception as exc:  # weights that are not the layers' parameters (old-style spectral_norm)
            raise TypeError(
                f"fbfast.from_module: could not verify {name}: fc1 and fc2 cannot be applied to a float64 "
                f"probe the way the rollout applies them, F.linear on their weight and bias "
                f"({type(exc).__name__}: {exc}). {_SUPPORTED}") from exc
        try:
            got = twin(*args)
        except Exception as exc:
            raise TypeError(
                f"fbfast.from_module: could not verify that {name} computes fc2(relu(fc1(x))): calling "
                f"{call} in float64 {case} raised {type(exc).__name__}: {exc}. {_SUPPORTED}") from exc
        if not isinstance(got, Tensor):
            what = f"a tuple of {len(got)}" if isinstance(got, tuple) else type(got).__name__
            raise TypeError(
                f"fbfast.from_module: could not verify {name}: {call} returned {what}, not one tensor "
                f"of shape {tuple(expected.shape)}. {_SUPPORTED}")
        if got.shape != expected.shape:
            raise TypeError(
                f"fbfast.from_module: could not verify {name}: {call} returned shape {tuple(got.shape)}, "
                f"but fc2(relu(fc1(x))) has shape {tuple(expected.shape)}. {_SUPPORTED}")
        tol = _RTOL * (1.0 + expected.abs().max().item())
        err = (got.to(torch.float64) - expected).abs().max().item()
        if not err <= tol:  # also true for NaN
            raise TypeError(_mismatch_message(module, got, err, tol, case, call, weights, parts, two))

    accelerators = sorted({t.device.index for t in itertools.chain(twin.parameters(), twin.buffers())
                           if t.device.type == "cuda"})
    flags = {m: m.training for m in twin.modules()}
    other = "eval" if module.training else "training"
    # fork_rng: a dropout in the copy's forward must not advance the caller's RNG.
    with torch.no_grad(), torch.random.fork_rng(devices=accelerators, device_type="cuda"):
        for weights in ("with its own weights",
                        "with random weights in fc1 and fc2 (the form must match, not only the current values)"):
            if weights.startswith("with random"):
                # Current values can hide a difference (a zero-initialized fc2 makes every
                # activation look alike); the copy's weights are ours to overwrite.
                for p in itertools.chain(fc1.parameters(), fc2.parameters()):
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
        _check_buffers(module, twin, fc1, fc2, check)


def _check_buffers(module: nn.Module, twin: nn.Module, fc1: nn.Linear, fc2: nn.Linear, check) -> None:
    """Buffers outside fc1/fc2 that the forward reads (an input normalization's mean and std)
    would be ignored by the view: perturb each in the copy and refuse if the output moves."""
    own = {id(b) for m in (fc1, fc2) for b in m.buffers()}
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
            f"fbfast.from_module: {type(module).__name__}'s forward reads buffers outside fc1 and fc2 "
            f"({', '.join(read)}): its output changes when they do, but they are not part of the "
            f"fused network fc2(relu(fc1(x))), and the view would ignore them. {_SUPPORTED}")


def _mismatch_message(module: nn.Module, got: Tensor, err: float, tol: float, case: str, call: str,
                      weights, parts: Dict[str, Tensor], two: bool) -> str:
    """Say by how much the forward differs and, where one of a few common variants reproduces
    it, which (the variants cost one 16-row matmul each)."""
    du, o = parts["u"].shape[-1], parts["x"].shape[-1]
    msg = (f"fbfast.from_module: {type(module).__name__}'s forward does not compute fc2(relu(fc1(x))) "
           f"with x = [u_t ; x_t]: {call} in float64 {case} differs from the fused network by up to "
           f"{err:.3g}")
    if got.dtype != torch.float64:
        msg += f" (it returned {got.dtype} for float64 input: does the forward cast?)"
    values = got.to(torch.float64)
    orders = [("u", "x"), ("x", "u")] if two else [("u", "x")]
    found = None
    for order in orders:
        inp = torch.cat([parts[r] for r in order], -1)
        for hidden, act in _HIDDEN:
            h = _fused(weights, inp, act)
            for outer, out_act in _OUTPUT:
                if (order, hidden, outer) == (("u", "x"), "relu", None):
                    continue
                if (out_act(h) - values).abs().max().item() <= tol:
                    found = (order, hidden, outer)
                    break
            if found:
                break
        if found:
            break
    if found:
        order, hidden, outer = found
        x_expr = f"cat([{order[0]}, {order[1]}])" if two else "x"
        expr = f"fc1({x_expr})" if hidden is None else f"{hidden}(fc1({x_expr}))"
        expr = f"fc2({expr})" if outer is None else f"{outer}(fc2({expr}))"
        what = []
        if hidden is None:
            what.append("it has no activation between fc1 and fc2, but fbfast fuses only ReLU")
        elif hidden != "relu":
            what.append(f"its hidden activation is {hidden}, but fbfast fuses only ReLU")
        if outer is not None:
            what.append(f"it applies {outer} to the output, while fbfast feeds fc2's output back as "
                        "it is (no output activation)")
        if order == ("x", "u"):
            what.append(
                f"wrong column order: it concatenates [x, u], but fbfast's fc1 reads [u_t ; x_t], "
                f"columns [0:{du}] of fc1.weight reading u and columns [{du}:] the fed-back x "
                "(fbfast/reference.py). Write the forward with torch.cat([u, x], -1); to keep weights "
                "trained the old way, also permute fc1's columns once: with torch.no_grad(): "
                f"fc1.weight.copy_(torch.cat([fc1.weight[:, {o}:], fc1.weight[:, :{o}]], 1))")
        msg += f". Its forward matches {expr}: " + "; ".join(what)
    else:
        tried = "ReLU, none, " + ", ".join(label for label, _ in _HIDDEN[2:])
        msg += (f". None of the variants fbfast tried matches it (hidden activation {tried}; tanh, "
                f"sigmoid or relu on the output{'; the columns as [x, u]' if two else ''})")
        skip = {id(m) for lin in _linears(module) for m in lin.modules()}
        others = [f"{n} ({_short_repr(m)})" for n, m in module.named_modules()
                  if n and id(m) not in skip]
        if others:
            msg += f"; besides fc1 and fc2 it has {', '.join(others)}"
    return f"{msg}. {_SUPPORTED}"
