"""Learn MuJoCo HalfCheetah's dynamics as model-based RL does, with the per-step loop and with fbfast.

The data: trajectories of Gymnasium's ``HalfCheetah-v5`` (the ``mujoco`` wheel ships the
simulator, Gymnasium the model files; nothing is downloaded at run time) under a smoothly
varying random policy, ``a_t = clip(0.8 a_{t-1} + 0.45 N(0, 1), -1, 1)``: state 17, action 6,
and the environment's reward.

The model: what mbrl-lib trains for this task (its default ``GaussianMLP`` without the
variance head): an ensemble of ``E = 7`` MLPs, 4 hidden layers of 200 with SiLU, predicting
the change of the state (a delta model: ``residual=True``) and the reward (an 18th output that
is not fed back: ``feedback=17``), on normalised states, actions and rewards:

    s_{t+1} = s_t + f_e([a_t ; s_t])[:17],   r_t = f_e([a_t ; s_t])[17]     (member e)

The training loss is a multi-step one: from a true state, the model rolls out ``H`` steps on
the true actions, feeding back its own predictions, and the MSE of the predicted states and
rewards against the true ones is minimised (backpropagation through the ``H`` steps). Each
member draws its own minibatch of windows (the bootstrap of an ensemble), so ``x0`` and ``u``
have the member axis. The same model, from the same initial weights, on the same minibatches,
with the same Adam optimizer, is trained twice:

* **loop**: the per-step loop a user writes: ``model(torch.cat([a_t, s], -1))`` per step, its
  ensemble layers one ``baddbmm`` each (fbfast's ``EnsembleLinear``, as mbrl-lib's);
* **fbfast**: ``model.rollout(s0, u=actions)``: the whole rollout, forward and backward, fused.

After every epoch the fbfast copy's weights are run through both rollouts on a fixed batch:
the losses must agree to float32 round-off (``rtol=1e-4``), or ``AssertionError``. (The two
training histories themselves drift apart slowly: float32 sums in another order differ by
~1e-7, and training amplifies that; see examples/train_pendulum.py.)

Why train through rollouts: a third copy, from the same weights, is trained with the usual
one-step loss (``H = 1``) on the same samples: each update's windows split into their ``H``
transitions. On held-out trajectories both models
predict open loop, from a true state over 30 steps of true actions; the error of the ensemble's
mean prediction against the horizon shows what the multi-step loss buys.

Output: a table per epoch (losses and time of each run, speedup), a summary table, and
``--out/halfcheetah.png`` (loss curves, error against horizon, true and predicted held-out
trajectories of a few state dimensions).

Run: ``python examples/halfcheetah_dynamics.py [--quick] [--epochs N] [--iters N] [--batch B]
[--horizon H] [--seed S] [--out DIR] [--no-plot]`` (``--help`` lists all). Needs
``pip install -r requirements-examples.txt`` (``make demo`` installs it). ``--quick`` runs in
well under a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch

import fbfast

STATE, ACTION = 17, 6
HIDDEN, HIDDEN_LAYERS, MEMBERS = 200, 4, 7
EVAL_HORIZON = 30
# Defaults, and --quick: a smaller data set and fewer updates, the same model.
FULL = dict(train_episodes=40, eval_episodes=6, episode_steps=1000, epochs=10, iters=100, batch=256, horizon=10)
QUICK = dict(train_episodes=12, eval_episodes=3, episode_steps=250, epochs=3, iters=15, batch=64, horizon=10)
AGREE_RTOL = 1e-4


@dataclass
class Data:
    """Normalised trajectories: states (N, L + 1, 17), actions (N, L, 6), rewards (N, L)."""
    states: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor


def collect(episodes: int, steps: int, seed: int) -> Data:
    """Roll the simulator out under a smoothly varying random policy."""
    import warnings

    import gymnasium as gym
    import mujoco

    # Gymnasium's half_cheetah.xml uses a compiler attribute that MuJoCo 4 deprecates; MuJoCo
    # prints that to stderr and writes MUJOCO_LOG.TXT into the working directory on every load.
    # It is the model file's matter, not this example's: drop that one warning, pass others on.
    previous = mujoco.get_mju_user_warning()

    def on_warning(message: str) -> None:
        if "settotalmass" not in message:
            warnings.warn(f"MuJoCo: {message}", RuntimeWarning)

    mujoco.set_mju_user_warning(on_warning)
    try:
        env = gym.make("HalfCheetah-v5")
    finally:
        mujoco.set_mju_user_warning(previous)
    rng = np.random.default_rng(seed)
    S = np.zeros((episodes, steps + 1, STATE), np.float32)
    A = np.zeros((episodes, steps, ACTION), np.float32)
    R = np.zeros((episodes, steps), np.float32)
    for i in range(episodes):
        s, _ = env.reset(seed=seed * 100_003 + i)
        a = rng.uniform(-1, 1, ACTION)
        S[i, 0] = s
        for t in range(steps):
            a = np.clip(0.8 * a + 0.45 * rng.standard_normal(ACTION), -1.0, 1.0)
            s, r, _, _, _ = env.step(a)
            A[i, t], R[i, t], S[i, t + 1] = a, r, s
    env.close()
    return Data(torch.from_numpy(S), torch.from_numpy(A), torch.from_numpy(R))


class Normaliser:
    """Per-feature mean and standard deviation of the training data."""

    def __init__(self, data: Data):
        self.s_mean, self.s_std = data.states.mean((0, 1)), data.states.std((0, 1)).clamp_min(1e-6)
        self.a_mean, self.a_std = data.actions.mean((0, 1)), data.actions.std((0, 1)).clamp_min(1e-6)
        self.r_mean, self.r_std = data.rewards.mean(), data.rewards.std().clamp_min(1e-6)

    def __call__(self, data: Data) -> Data:
        return Data((data.states - self.s_mean) / self.s_std, (data.actions - self.a_mean) / self.a_std,
                    (data.rewards - self.r_mean) / self.r_std)


class Windows:
    """Every window of ``horizon`` steps of the normalised trajectories: start state, actions,
    next states and rewards, gathered for a (members, batch) grid of window indices."""

    def __init__(self, data: Data, horizon: int):
        self.data, self.horizon = data, horizon
        self.per_episode = data.actions.shape[1] - horizon + 1
        self.count = data.actions.shape[0] * self.per_episode

    def pick(self, u: torch.Tensor) -> torch.Tensor:
        """Window indices from uniform [0, 1) draws of any shape."""
        return (u * self.count).long().clamp_max(self.count - 1)

    def split(self, idx: torch.Tensor, longer: "Windows") -> torch.Tensor:
        """Windows (E, B) of ``longer`` as this one's: each of its H / h consecutive windows of
        h steps, (E, B H / h); the same indices when the horizons agree."""
        if longer.horizon == self.horizon:
            return idx
        ep, t0 = idx // longer.per_episode, idx % longer.per_episode
        t = t0.unsqueeze(-1) + torch.arange(0, longer.horizon - self.horizon + 1, self.horizon)
        return (ep.unsqueeze(-1) * self.per_episode + t).flatten(1)

    def gather(self, idx: torch.Tensor):
        """idx (E, B) -> x0 (1, E, B, 17), u (H, E, B, 6), states (H, E, B, 17), rewards (H, E, B)."""
        ep, t0 = idx // self.per_episode, idx % self.per_episode
        t = t0.unsqueeze(0) + torch.arange(self.horizon).view(-1, 1, 1)  # (H, E, B)
        d = self.data
        return (d.states[ep, t0].unsqueeze(0), d.actions[ep, t], d.states[ep, t + 1], d.rewards[ep, t])


def make_model(seed: int) -> fbfast.FeedbackMLP:
    torch.manual_seed(seed)
    return fbfast.FeedbackMLP(ACTION + STATE, HIDDEN, STATE + 1, hidden_layers=HIDDEN_LAYERS, activation="silu",
                              feedback=STATE, residual=True, ensemble=MEMBERS)


def loop_rollout(model: fbfast.FeedbackMLP, x0: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The per-step loop a user writes: x0 (1, E, B, 17) or (E, B, 17), u (H, E, B, 6) ->
    (H, E, B, 18); the next state is the state plus the predicted change."""
    s = x0.reshape(x0.shape[-3:])
    outs = []
    for t in range(u.shape[0]):
        out = model(torch.cat([u[t], s], dim=-1))
        y = torch.cat([s + out[..., :STATE], out[..., STATE:]], dim=-1)
        outs.append(y)
        s = y[..., :STATE]
    return torch.stack(outs)


def fbfast_rollout(model: fbfast.FeedbackMLP, x0: torch.Tensor, u: torch.Tensor, backend: str = "auto"):
    return model.rollout(x0, u=u, backend=backend)


def loss_of(pred: torch.Tensor, states: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    return (pred[..., :STATE] - states).pow(2).mean() + (pred[..., STATE] - rewards).pow(2).mean()


def open_loop_error(model: fbfast.FeedbackMLP, data: Data, horizon: int) -> torch.Tensor:
    """Per horizon 1..H: the RMS error (normalised state units) of the ensemble's mean open-loop
    prediction, over every non-overlapping window of the held-out episodes."""
    L = data.actions.shape[1]
    starts = torch.arange(0, L - horizon + 1, horizon)
    x0 = data.states[:, starts].reshape(-1, STATE)                      # (W, 17)
    t = starts.view(-1, 1) + torch.arange(horizon)                       # (n, H)
    u = data.actions[:, t].reshape(-1, horizon, ACTION).transpose(0, 1)  # (H, W, 6)
    truth = data.states[:, t + 1].reshape(-1, horizon, STATE).transpose(0, 1)
    with torch.no_grad():
        pred = model.rollout(x0.unsqueeze(0), u=u).mean(1)  # shared x0/u, mean over members: (H, W, 18)
    return (pred[..., :STATE] - truth).pow(2).mean((1, 2)).sqrt()


def train(models: Dict[str, fbfast.FeedbackMLP], rollouts: Dict, windows: Dict[str, Windows], multi: Windows,
          cfg: dict, seed: int, check_batch, progress: bool) -> Dict[str, Dict[str, List[float]]]:
    """Train each model with its rollout on its windows, on the same minibatch indices (per
    epoch: mean training loss and the seconds of its updates); after each epoch, the strict
    same-weights check of the two rollouts."""
    opts = {k: torch.optim.Adam(m.parameters(), lr=1e-3) for k, m in models.items()}
    history = {k: {"loss": [], "seconds": []} for k in models}
    try:
        from tqdm import tqdm
    except ImportError:  # the progress bar is optional
        progress = False
    # One untimed forward and backward of each first (no update): one-time costs such as thread
    # pools, packing and first-call dispatch are not a training epoch's.
    for name, model in models.items():
        loss_of(rollouts[name](model, *check_batch[:2]), *check_batch[2:]).backward()
        model.zero_grad()
    for epoch in range(cfg["epochs"]):
        gen = torch.Generator().manual_seed(seed * 1000 + epoch)
        picks = [torch.rand(MEMBERS, cfg["batch"], generator=gen) for _ in range(cfg["iters"])]
        for name, model in models.items():
            w = windows[name]
            total, seconds = 0.0, 0.0
            bar = picks if not progress else tqdm(picks, desc=f"epoch {epoch + 1} {name}", leave=False,
                                                 file=sys.stderr)
            for pick in bar:
                # The same windows for every run; a shorter-horizon run (one-step) gets each
                # window's transitions as its own windows: the same samples per update.
                x0, u, s, r = w.gather(w.split(multi.pick(pick), multi))
                start = time.perf_counter()
                loss = loss_of(rollouts[name](model, x0, u), s, r)
                opts[name].zero_grad()
                loss.backward()
                opts[name].step()
                seconds += time.perf_counter() - start
                total += loss.item()
            history[name]["loss"].append(total / len(picks))
            history[name]["seconds"].append(seconds)
        same_weights_check(models["fbfast"], *check_batch)
        row = "  ".join(f"{k} {h['loss'][-1]:.4f} ({h['seconds'][-1]:.2f} s)" for k, h in history.items())
        print(f"epoch {epoch + 1:3d}: {row}", flush=True)
    return history


def same_weights_check(model: fbfast.FeedbackMLP, x0, u, s, r) -> float:
    """Both rollouts on the same weights and batch: the losses agree to float32 round-off."""
    with torch.no_grad():
        a = loss_of(fbfast_rollout(model, x0, u), s, r).item()
        b = loss_of(loop_rollout(model, x0, u), s, r).item()
    if not abs(a - b) <= AGREE_RTOL * abs(b):
        raise AssertionError(f"fbfast and the loop disagree on the same weights: loss {a!r} vs {b!r}")
    return abs(a - b) / abs(b)


def plot(path: str, history, errors, model_multi, model_one, eval_data: Data, norm: Normaliser) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 3, figsize=(15, 8))
    epochs = range(1, len(history["loop"]["loss"]) + 1)
    for name, style in (("loop", "o-"), ("fbfast", "x--"), ("one-step", ":")):
        if name in history:
            ax[0, 0].plot(epochs, history[name]["loss"], style, label=name)
    ax[0, 0].set(title="training loss (normalised MSE)", xlabel="epoch", yscale="log")
    ax[0, 0].legend()
    h = np.arange(1, len(errors["multi-step"]) + 1)
    for name, err in errors.items():
        ax[0, 1].plot(h, err.numpy(), label=f"{name} loss")
    ax[0, 1].set(title="held-out open-loop error", xlabel="horizon (steps)", ylabel="RMS error (normalised)",
                 yscale="log")
    ax[0, 1].legend()
    # One held-out window, in physical units.
    x0 = eval_data.states[0, 0].view(1, 1, STATE)
    u = eval_data.actions[0, :EVAL_HORIZON].unsqueeze(1)
    truth = eval_data.states[0, 1:EVAL_HORIZON + 1] * norm.s_std + norm.s_mean
    with torch.no_grad():
        preds = {name: m.rollout(x0, u=u).mean(1)[:, 0, :STATE] * norm.s_std + norm.s_mean
                 for name, m in (("multi-step", model_multi), ("one-step", model_one))}
    names = {0: "rootz", 1: "rooty (pitch)", 8: "rootx velocity", 9: "rootz velocity"}
    for k, (dim, label) in enumerate(names.items()):
        a = ax.flat[2 + k]
        a.plot(truth[:, dim].numpy(), "k-", label="true")
        for name, p in preds.items():
            a.plot(p[:, dim].numpy(), "--" if name == "multi-step" else ":", label=name)
        a.set(title=f"state {dim}: {label}", xlabel="step")
        a.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a small data set and few updates (well under a minute)")
    for key in FULL:
        p.add_argument("--" + key.replace("_", "-"), type=int, default=None, help=f"default {FULL[key]}, "
                       f"quick {QUICK[key]}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto", help="fbfast's backend (default auto)")
    p.add_argument("--out", default="out", help="folder of halfcheetah.png (default out)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    args = p.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    cfg.update({k: getattr(args, k) for k in FULL if getattr(args, k) is not None})

    start = time.perf_counter()
    raw_train = collect(cfg["train_episodes"], cfg["episode_steps"], args.seed)
    raw_eval = collect(cfg["eval_episodes"], cfg["episode_steps"], args.seed + 1)
    sim_seconds = time.perf_counter() - start
    norm = Normaliser(raw_train)
    train_data, eval_data = norm(raw_train), norm(raw_eval)
    steps = cfg["train_episodes"] * cfg["episode_steps"]
    print(f"HalfCheetah-v5: {steps} training and {cfg['eval_episodes'] * cfg['episode_steps']} held-out steps "
          f"simulated in {sim_seconds:.1f} s; ensemble of {MEMBERS} MLPs, {HIDDEN_LAYERS} x {HIDDEN} SiLU, delta "
          f"model + reward head; {cfg['epochs']} epochs x {cfg['iters']} updates of {cfg['batch']} windows of "
          f"{cfg['horizon']} steps per member")

    base = make_model(args.seed)
    models = {"loop": copy.deepcopy(base), "fbfast": copy.deepcopy(base), "one-step": copy.deepcopy(base)}
    backend = args.backend
    rollouts = {"loop": loop_rollout, "fbfast": lambda m, x0, u: fbfast_rollout(m, x0, u, backend),
                "one-step": lambda m, x0, u: fbfast_rollout(m, x0, u, backend)}
    multi = Windows(train_data, cfg["horizon"])
    windows = {"loop": multi, "fbfast": multi, "one-step": Windows(train_data, 1)}
    check_batch = multi.gather(torch.randint(multi.count, (MEMBERS, 32), generator=torch.Generator().manual_seed(7)))
    history = train(models, rollouts, windows, multi, cfg, args.seed, check_batch, not args.no_progress)

    horizon = min(EVAL_HORIZON, cfg["episode_steps"])
    errors = {"multi-step": open_loop_error(models["fbfast"], eval_data, horizon),
              "one-step": open_loop_error(models["one-step"], eval_data, horizon)}
    loop_s, fused_s = sum(history["loop"]["seconds"]), sum(history["fbfast"]["seconds"])
    epochs = cfg["epochs"]
    print()
    print("| run | time per epoch | final training loss |")
    print("|---|---:|---:|")
    for name in ("loop", "fbfast", "one-step"):
        h = 1 if name == "one-step" else cfg["horizon"]
        print(f"| {name} (H = {h}) | {sum(history[name]['seconds']) / epochs:.2f} s | "
              f"{history[name]['loss'][-1]:.4f} |")
    print()
    print(f"fbfast trained {loop_s / fused_s:.2f}x faster than the loop ({fused_s / epochs:.2f} s vs "
          f"{loop_s / epochs:.2f} s per epoch of {cfg['iters']} updates; backend {backend!r}).")
    print()
    shown = [h for h in (1, 5, 10, 20, 30) if h <= horizon]
    print("| held-out open-loop RMS error (normalised) | " + " | ".join(f"{h} steps" for h in shown) + " |")
    print("|---|" + "---:|" * len(shown))
    for name, err in errors.items():
        print(f"| {name} loss | " + " | ".join(f"{err[h - 1]:.3f}" for h in shown) + " |")
    figure = None
    if not args.no_plot:
        figure = os.path.join(args.out, "halfcheetah.png")
        plot(figure, history, errors, models["fbfast"], models["one-step"], eval_data, norm)
        print(f"\nsaved {figure}")
    return {"history": history, "errors": {k: v.tolist() for k, v in errors.items()}, "speedup": loop_s / fused_s,
            "config": cfg, "figure": figure}


if __name__ == "__main__":
    main()
