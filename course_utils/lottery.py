"""A lottery-ticket experiment that trains in seconds on a CPU: an MLP on scikit-learn's bundled digits.

Frankle and Carbin (2019): train a dense network, prune the smallest-magnitude weights, *rewind* the
survivors to their initial values and train again; repeat. The sparse network found this way (a "winning
ticket") trains to the dense accuracy at sparsities where the same mask with freshly drawn weights does not.
``iterative_magnitude_pruning`` runs both arms from the same seed: ``rewind="init"`` (the ticket) and
``rewind="random"`` (the control: same masks' sparsity, new random weights each round). The data ship with
scikit-learn (1,797 8x8 images), so nothing is downloaded. Masks use ``torch.nn.utils.prune``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import prune


def digits_split(seed: int = 0, test_share: float = 0.3) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test): standardised digits, a seeded random split."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(test_share * len(x))
    test, train = order[:n_test], order[n_test:]
    mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-6)
    return (x[train] - mean) / std, y[train], (x[test] - mean) / std, y[test]


def make_mlp(seed: int, hidden: tuple[int, ...] = (128, 64)) -> nn.Sequential:
    """64 -> hidden -> 10, ReLU, initialised from ``seed``."""
    torch.manual_seed(seed)
    sizes = (64, *hidden, 10)
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def linears(model: nn.Sequential) -> list[nn.Linear]:
    return [m for m in model if isinstance(m, nn.Linear)]


def train(model: nn.Module, data: tuple[torch.Tensor, ...], epochs: int = 40, lr: float = 2e-3,
          batch_size: int = 64, seed: int = 0) -> float:
    """Adam on the training split; returns the test accuracy. Masked weights stay zero (prune's re-parametrisation)."""
    x_train, y_train, x_test, y_test = data
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x_train), generator=generator).split(batch_size):
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
            optimiser.step()
    model.eval()
    with torch.no_grad():
        return float((model(x_test).argmax(-1) == y_test).float().mean())


def sparsity(model: nn.Sequential) -> float:
    weights = [m.weight for m in linears(model)]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def iterative_magnitude_pruning(seed: int, rounds: int, rate: float = 0.2, rewind: str = "init",
                                data: tuple[torch.Tensor, ...] | None = None, epochs: int = 40
                                ) -> list[tuple[float, float]]:
    """[(sparsity, test accuracy)] after training dense, then after each pruning round.

    Each round removes ``rate`` of the surviving weights of every layer by magnitude (the output layer at
    half the rate, as in the paper), then resets the survivors to the initial weights (``"init"``) or to a
    fresh random draw (``"random"``), and trains again.
    """
    if rewind not in ("init", "random"):
        raise ValueError(f"rewind must be 'init' or 'random'; got {rewind!r}")
    data = data if data is not None else digits_split(seed)
    model = make_mlp(seed)
    initial = copy.deepcopy(model.state_dict())
    history = [(0.0, train(model, data, epochs, seed=seed))]
    for r in range(1, rounds + 1):
        layers = linears(model)
        for i, module in enumerate(layers):
            share = rate / 2 if i == len(layers) - 1 else rate
            prune.l1_unstructured(module, "weight", amount=share)  # of the surviving weights (prune's container)
        start = initial if rewind == "init" else make_mlp(seed + 1000 * r).state_dict()
        with torch.no_grad():
            for i, module in enumerate(layers):
                module.weight_orig.copy_(start[f"{2 * i}.weight"])
                module.bias.copy_(start[f"{2 * i}.bias"])
        history.append((sparsity(model), train(model, data, epochs, seed=seed)))
    return history
