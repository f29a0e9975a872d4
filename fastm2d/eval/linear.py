"""The paper's linear-evaluation protocol (as the original's evaluation package runs it): clip embeddings
standardised with the training split's statistics, one linear layer (optionally hidden layers) trained with Adam,
early stopping on the validation loss (patience 20 epochs), the test score of the weights with the best
validation loss, repeated over seeds;
accuracy for single-label tasks, mAP for multi-label ones; mean and 95 % confidence interval."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, Sequence

import numpy as np
import torch
from torch import nn

from .scores import confidence_interval
from .tasks import EvalTask


@dataclass
class ProbeConfig:
    """The probe's settings (`fastm2d linear-eval TASK --weights W key=value ...` overrides them)."""
    lr: float = 1e-3  # Adam
    max_epochs: int = 300
    patience: int = 20  # epochs without a better validation loss before stopping
    batch_size: int = 64  # the probe's own batch (not the embedding batch, --batch-size)


def train_linear_probe(x_train, y_train, x_valid, y_valid, multi_label: bool, seed: int, hidden: Sequence[int] = (),
                       lr: float = 1e-3, max_epochs: int = 300, patience: int = 20, batch_size: int = 64,
                       device: str | torch.device = "cpu") -> nn.Module:
    """-> the best-on-valid classifier over already standardised float32 features."""
    with torch.enable_grad():  # also when called from no-grad code (the monitors)
        return _train(x_train, y_train, x_valid, y_valid, multi_label, seed, hidden, lr, max_epochs, patience,
                      batch_size, device)


def _train(x_train, y_train, x_valid, y_valid, multi_label, seed, hidden, lr, max_epochs, patience, batch_size,
           device) -> nn.Module:
    torch.manual_seed(seed)
    dims = [x_train.shape[1], *hidden, y_train.shape[1]]
    layers = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    xt, yt = torch.as_tensor(x_train, device=device), torch.as_tensor(y_train, device=device)
    xv, yv = torch.as_tensor(x_valid, device=device), torch.as_tensor(y_valid, device=device)
    loss_fn = nn.BCEWithLogitsLoss() if multi_label else nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(seed)
    # The validation LOSS decides (a continuous signal: accuracy plateaus while the classifier still improves).
    best, best_state, waited = np.inf, copy.deepcopy(model.state_dict()), 0
    for _ in range(max_epochs):
        model.train()
        for idx in torch.randperm(len(xt), generator=g).split(batch_size):
            target = yt[idx] if multi_label else yt[idx].argmax(1)
            loss = loss_fn(model(xt[idx]), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            score = float(loss_fn(model(xv), yv if multi_label else yv.argmax(1)))
        if score < best:
            best, best_state, waited = score, copy.deepcopy(model.state_dict()), 0
        else:
            waited += 1
            if waited >= patience:
                break
    model.load_state_dict(best_state)
    return model.eval()


def linear_eval(embeddings: np.ndarray, task: EvalTask, seeds: int = 5, **probe) -> Dict:
    """Standardise on train, probe per seed, score test. -> {'metric', 'scores', 'mean', 'ci95', ...}."""
    tr, va, te = task.index("train"), task.index("valid"), task.index("test")
    mean, std = embeddings[tr].mean(0), embeddings[tr].std(0) + 1e-8
    x = ((embeddings - mean) / std).astype(np.float32)
    scores = []
    for seed in range(seeds):
        clf = train_linear_probe(x[tr], task.labels[tr], x[va], task.labels[va], task.multi_label, seed, **probe)
        with torch.no_grad():
            logits = clf(torch.as_tensor(x[te], device=next(clf.parameters()).device))
        scores.append(task.score(logits.float().cpu().numpy(), te))
    m, half = confidence_interval(scores)
    return {"task": task.name, "metric": task.metric, "scores": scores, "mean": m,
            "ci95": half, "seeds": seeds, "n_train": len(tr), "n_valid": len(va), "n_test": len(te),
            "classes": len(task.classes)}
