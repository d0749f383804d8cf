"""A NARX model of the yearly sunspot numbers, trained by simulation error, with the per-step loop
and with fbfast.

The data: the yearly mean sunspot numbers 1700-2008 shipped in the ``statsmodels`` wheel
(``statsmodels.api.datasets.sunspots``; no download), 309 years, scaled to unit variance over
the training years.

The model: a nonlinear autoregression with a tapped delay line of its own past outputs,

    y_t = f(y_{t-1}, ..., y_{t-9})       f: 2 hidden tanh layers of 32

a ``FeedbackMLP`` with ``delay=(1, ..., 9)`` (``x0`` holds the 9 values before the first
predicted year). It is trained by simulation error, as system identification does (deepSI's
and SysIdentPy's "free run" training): from the 9 true values before a window, the model runs
free for ``W`` years, feeding back its own predictions, and the MSE against the true series is
minimised, with truncated backpropagation through time (``truncate=K``). Every window of the
training years is one row of the batch.

The same network, from the same initial weights, with the same Adam optimizer, is trained
twice: through the per-step loop a user writes (a ``torch.cat`` of the last 9 outputs per step)
and through ``fbfast.rollout``. After every epoch the fbfast copy's weights are run through
both on the whole training batch: the losses must agree to float32 round-off, or
``AssertionError``.

Evaluation: a free-run prediction of the last ``--test-years`` years from the 9 true values
before them, against the truth: its RMSE over the first cycle (11 years) and over all of them,
beside the naive forecast that repeats the last cycle before them (the 11 years before the
held-out ones, over and over: it sees no held-out value). Forty years
of free run from nine values is a hard test; the loop and fbfast train the same model to the
same error, which is what this example compares.

Output: a per-epoch table, a summary (time per epoch of each run, speedup, test RMSE) and
``--out/sunspots.png``. Run: ``python examples/sunspots_narx.py [--quick] [--epochs N]
[--window W] [--truncate K] [--out DIR] [--no-plot]``. Needs ``pip install -r
requirements-examples.txt`` (``make demo`` installs it).
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from typing import Dict, List, Optional, Tuple

import torch

import fbfast

LAGS = tuple(range(1, 10))
HIDDEN = 32
FULL = dict(epochs=600, window=20, truncate=10, test_years=40)
QUICK = dict(epochs=100, window=20, truncate=10, test_years=40)
CYCLE = 11  # years: the sunspot cycle, the naive forecast's period and the short horizon reported
AGREE_RTOL = 1e-4


def load_series(test_years: int) -> Tuple[torch.Tensor, float]:
    """The yearly sunspot numbers, (309,), scaled to unit variance over the years before the last
    ``test_years`` (float32), and the scale."""
    import statsmodels.api as sm

    values = torch.tensor(sm.datasets.sunspots.load_pandas().data["SUNACTIVITY"].to_numpy(), dtype=torch.float32)
    scale = float(values[:-test_years].std())
    return values / scale, scale


def windows(series: torch.Tensor, window: int):
    """Every window of the series: x0 (9, N, 1) = the 9 values before it, oldest first; targets
    (W, N, 1)."""
    D = max(LAGS)
    starts = torch.arange(D, len(series) - window + 1)
    x0 = torch.stack([series[s - D:s] for s in starts], dim=1).unsqueeze(-1)
    target = torch.stack([series[s:s + window] for s in starts], dim=1).unsqueeze(-1)
    return x0, target


def make_model(seed: int) -> fbfast.FeedbackMLP:
    torch.manual_seed(seed)
    return fbfast.FeedbackMLP(len(LAGS), HIDDEN, 1, hidden_layers=2, activation="tanh", delay=LAGS)


def loop_rollout(model: fbfast.FeedbackMLP, x0: torch.Tensor, steps: int, truncate: Optional[int] = None):
    """The per-step loop a user writes: concatenate the last 9 values (newest first, the lag
    order (1, ..., 9)) as the next input. Truncated BPTT as fbfast defines it (docs/spec.md
    §1.2): every step t with t % truncate == 0 reads the model's earlier outputs detached (the
    given starting values are inputs, never cut)."""
    D = max(LAGS)
    history = list(x0.unbind(0))  # history[D + s]: the value of year s (s < 0: x0)
    for t in range(steps):
        cut = truncate and t % truncate == 0
        reads = [history[D + t - d].detach() if cut and t - d >= 0 else history[D + t - d] for d in LAGS]
        history.append(model(torch.cat(reads, dim=-1)))
    return torch.stack(history[D:])


def fbfast_rollout(model: fbfast.FeedbackMLP, x0: torch.Tensor, steps: int, truncate: Optional[int] = None,
                   backend: str = "auto"):
    return model.rollout(x0, steps=steps, truncate=truncate, backend=backend)


def main(argv: Optional[List[str]] = None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer epochs (seconds)")
    for key in FULL:
        p.add_argument("--" + key.replace("_", "-"), type=int, default=None,
                       help=f"default {FULL[key]}, quick {QUICK[key]}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto")
    p.add_argument("--out", default="out")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    args = p.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    cfg.update({k: getattr(args, k) for k in FULL if getattr(args, k) is not None})

    series, scale = load_series(cfg["test_years"])
    n_test = cfg["test_years"]
    train_series = series[:-n_test]
    x0, target = windows(train_series, cfg["window"])
    W, K = cfg["window"], cfg["truncate"]
    print(f"sunspots 1700-2008: {len(train_series)} training years ({x0.shape[1]} windows of {W}), last "
          f"{n_test} held out; NARX lags 1-{max(LAGS)}, 2 x {HIDDEN} tanh; free-run training, truncate={K}")

    base = make_model(args.seed)
    models = {"loop": copy.deepcopy(base), "fbfast": copy.deepcopy(base)}
    rollouts = {"loop": lambda m: loop_rollout(m, x0, W, K),
                "fbfast": lambda m: fbfast_rollout(m, x0, W, K, args.backend)}
    opts = {k: torch.optim.Adam(m.parameters(), lr=3e-3) for k, m in models.items()}
    history = {k: {"loss": [], "seconds": []} for k in models}
    epochs = range(cfg["epochs"])
    if not args.no_progress:
        try:
            from tqdm import tqdm
            epochs = tqdm(epochs, desc="epochs", leave=False)
        except ImportError:
            pass
    # One untimed forward and backward of each first (no update): one-time costs such as thread
    # pools and first-call dispatch are not a training epoch's.
    for name, model in models.items():
        (rollouts[name](model) - target).pow(2).mean().backward()
        model.zero_grad()
    for epoch in epochs:
        for name, model in models.items():
            start = time.perf_counter()
            loss = (rollouts[name](model) - target).pow(2).mean()
            opts[name].zero_grad()
            loss.backward()
            opts[name].step()
            history[name]["seconds"].append(time.perf_counter() - start)
            history[name]["loss"].append(loss.item())
        with torch.no_grad():  # the same weights through both: float32 round-off apart
            a = (fbfast_rollout(models["fbfast"], x0, W, K, args.backend) - target).pow(2).mean().item()
            b = (loop_rollout(models["fbfast"], x0, W, K) - target).pow(2).mean().item()
        if not abs(a - b) <= AGREE_RTOL * abs(b):
            raise AssertionError(f"epoch {epoch}: fbfast and the loop disagree on the same weights: {a!r} vs {b!r}")

    # Free run over the held-out years, from the 9 true values before them.
    D = max(LAGS)
    start_x0 = series[-n_test - D:-n_test].view(D, 1, 1)
    truth = series[-n_test:]
    with torch.no_grad():
        pred = {k: fbfast_rollout(m, start_x0, n_test).view(-1) for k, m in models.items()}
    def rmse_of(p: torch.Tensor, years: int) -> float:
        return (p[:years] - truth[:years]).pow(2).mean().sqrt().item() * scale

    last_cycle = series[-n_test - CYCLE:-n_test]
    naive = last_cycle.repeat((n_test + CYCLE - 1) // CYCLE)[:n_test]
    rmse = {k: (rmse_of(v, CYCLE), rmse_of(v, n_test)) for k, v in pred.items()}
    rmse_naive = (rmse_of(naive, CYCLE), rmse_of(naive, n_test))

    loop_s, fused_s = sum(history["loop"]["seconds"]), sum(history["fbfast"]["seconds"])
    n = len(history["loop"]["seconds"])
    print()
    print(f"| run | time per epoch | final training loss | free-run RMSE, {CYCLE} years | {n_test} years |")
    print("|---|---:|---:|---:|---:|")
    for k in models:
        print(f"| {k} | {sum(history[k]['seconds']) / n * 1e3:.2f} ms | {history[k]['loss'][-1]:.4f} | "
              f"{rmse[k][0]:.1f} | {rmse[k][1]:.1f} |")
    print(f"| repeat the last {CYCLE} years before them | | | {rmse_naive[0]:.1f} | {rmse_naive[1]:.1f} |")
    print()
    print(f"fbfast trained {loop_s / fused_s:.1f}x faster than the loop ({fused_s / n * 1e3:.2f} ms vs "
          f"{loop_s / n * 1e3:.2f} ms per epoch). RMSE in sunspot numbers of the free run from the 9 years "
          f"before the held-out ones, over their first {CYCLE} and all {n_test}.")
    figure = None
    if not args.no_plot:
        figure = os.path.join(args.out, "sunspots.png")
        plot(figure, history, series * scale, pred["fbfast"] * scale, n_test)
        print(f"\nsaved {figure}")
    return {"history": history, "rmse": rmse, "rmse_naive": rmse_naive, "speedup": loop_s / fused_s,
            "figure": figure, "config": cfg}


def plot(path: str, history, series: torch.Tensor, pred: torch.Tensor, n_test: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(13, 4))
    for name, style in (("loop", "-"), ("fbfast", "--")):
        ax[0].plot(history[name]["loss"], style, label=name)
    ax[0].set(title="training loss (free-run MSE, scaled)", xlabel="epoch", yscale="log")
    ax[0].legend()
    years = torch.arange(1700, 1700 + len(series))
    ax[1].plot(years.numpy(), series.numpy(), "k-", label="sunspot number")
    ax[1].plot(years[-n_test:].numpy(), pred.numpy(), "r--", label="NARX free run (fbfast)")
    ax[1].axvline(int(years[-n_test]), color="gray", lw=0.8)
    ax[1].set(title="held-out years: free-run prediction", xlabel="year")
    ax[1].legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
