"""``softxent demo``: the seed's network trained on scikit-learn's handwritten digits.

8×8 digit images (64 inputs) → hidden layer (tanh or ReLU) → 10 logits →
softmax, trained with mini-batch Adam in NumPy.  Backprop starts at the
cross-entropy gradient p − y that softxent returns; before training, the whole
network's gradient is checked against central differences.  Writes a PNG with
the learning curves and the test-set confusion matrix, and ``metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

import softxent as sx
from softxent._gradcheck import gradient_errors, numerical_gradient

from . import mlp
from .arguments import UsageError, output_dir, seed

#: the whole-network gradient check passes below this relative error
GRADCHECK_TOLERANCE = 1e-6


def _require_demo_extras():
    try:
        import matplotlib  # noqa: F401
        import sklearn  # noqa: F401
        import tqdm  # noqa: F401
    except ImportError as exc:
        raise SystemExit(
            f"softxent demo needs scikit-learn, matplotlib and tqdm ({exc.name} is missing): "
            "pip install 'softxent[demo]'"
        ) from None


def load_digits_split(seed: int, test_size: float = 0.2):
    """Digits scaled to [0, 1], stratified train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    return train_test_split(x, y, test_size=test_size, random_state=seed, stratify=y)


def check_network_gradient(params, x, y, activation) -> float:
    """Max relative error between backprop and central differences over every parameter."""
    _, grads = mlp.loss_and_grads(params, x, y, activation)
    worst = 0.0
    for name in mlp.PARAM_NAMES:
        probe = {k: v.copy() for k, v in params.items()}

        def f(value, name=name, probe=probe):
            probe[name] = value
            return mlp.loss(probe, x, y, activation)

        numeric = numerical_gradient(f, params[name].copy())
        worst = max(worst, gradient_errors(grads[name], numeric)[1])
    return worst


def accuracy(params, x, y, activation) -> float:
    return float((mlp.logits(params, x, activation).argmax(axis=1) == y).mean())


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def write_plot(history: dict, cm: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = np.arange(1, len(history["train_loss"]) + 1)
    fig, (ax_loss, ax_acc, ax_cm) = plt.subplots(1, 3, figsize=(15, 4.5))
    ax_loss.plot(epochs, history["train_loss"], label="train")
    ax_loss.plot(epochs, history["test_loss"], label="test")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss", yscale="log")
    ax_loss.legend()
    ax_acc.plot(epochs, history["train_accuracy"], label="train")
    ax_acc.plot(epochs, history["test_accuracy"], label="test")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0.5, 1.0))
    ax_acc.legend()
    ax_cm.imshow(cm, cmap="Blues")
    for (i, j), count in np.ndenumerate(cm):
        if count:
            color = "white" if count > cm.max() / 2 else "black"
            ax_cm.text(j, i, str(count), ha="center", va="center", fontsize=8, color=color)
    ax_cm.set(xlabel="predicted digit", ylabel="true digit", title="test confusion matrix")
    ax_cm.set_xticks(range(cm.shape[0]))
    ax_cm.set_yticks(range(cm.shape[0]))
    fig.suptitle("softxent demo: 64 → hidden → 10 → softmax on scikit-learn digits")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def train(args: argparse.Namespace, log=print) -> dict:
    """Gradient check, then training; returns the metrics (and writes the PNG)."""
    from tqdm import tqdm

    start = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    x_train, x_test, y_train, y_test = load_digits_split(args.seed)
    params = mlp.init_params(x_train.shape[1], args.hidden, 10, rng)

    sample = rng.choice(len(x_train), size=16, replace=False)
    rel_err = check_network_gradient(params, x_train[sample], y_train[sample], args.activation)
    verdict = "ok" if rel_err < GRADCHECK_TOLERANCE else "FAILED"
    log(f"gradient check of the whole network (float64 central differences): max rel err {rel_err:.2e} {verdict}")
    if rel_err >= GRADCHECK_TOLERANCE:
        raise SystemExit(1)

    optimizer = mlp.Adam(params, lr=args.lr)
    history = {k: [] for k in ("train_loss", "test_loss", "train_accuracy", "test_accuracy")}
    for epoch in range(1, args.epochs + 1):
        order = rng.permutation(len(x_train))
        batches = range(0, len(order), args.batch_size)
        for lo in tqdm(batches, desc=f"epoch {epoch:3d}/{args.epochs}", leave=False, unit="batch", file=sys.stderr):
            idx = order[lo : lo + args.batch_size]
            _, grads = mlp.loss_and_grads(params, x_train[idx], y_train[idx], args.activation)
            optimizer.step(params, grads)
        history["train_loss"].append(mlp.loss(params, x_train, y_train, args.activation))
        history["test_loss"].append(mlp.loss(params, x_test, y_test, args.activation))
        history["train_accuracy"].append(accuracy(params, x_train, y_train, args.activation))
        history["test_accuracy"].append(accuracy(params, x_test, y_test, args.activation))
        log(
            f"epoch {epoch:3d}  train loss {history['train_loss'][-1]:.4f}  "
            f"train acc {history['train_accuracy'][-1]:.2%}  test acc {history['test_accuracy'][-1]:.2%}"
        )

    probs = sx.softmax(mlp.logits(params, x_test, args.activation))
    cm = confusion_matrix(y_test, probs.argmax(axis=1), 10)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_path = out / "demo.png"
    write_plot(history, cm, plot_path)
    metrics = {
        "test_accuracy": history["test_accuracy"][-1],
        "train_accuracy": history["train_accuracy"][-1],
        "test_loss": history["test_loss"][-1],
        "gradient_check_max_rel_error": rel_err,
        "seconds": time.perf_counter() - start,
        "epochs": args.epochs,
        "hidden": args.hidden,
        "activation": args.activation,
        "plot": str(plot_path),
        "history": history,
        "confusion_matrix": cm.tolist(),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=int, default=30, help="passes over the training set (default 30)")
    parser.add_argument("--hidden", type=int, default=64, help="hidden units (default 64)")
    parser.add_argument(
        "--activation", choices=("tanh", "relu"), default="tanh", help="hidden activation (default tanh)"
    )
    parser.add_argument("--lr", type=float, default=0.01, help="Adam learning rate (default 0.01)")
    parser.add_argument("--batch-size", type=int, default=32, help="mini-batch size (default 32)")
    parser.add_argument("--seed", type=seed, default=0, help="seed of the split, init and shuffling (default 0)")
    parser.add_argument("--out", default="softxent-demo", help="folder for demo.png and metrics.json")


def main(args: argparse.Namespace) -> int:
    _require_demo_extras()
    for name in ("epochs", "hidden", "batch_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 < args.lr < math.inf:
        raise UsageError("--lr must be a finite number > 0")
    output_dir(args.out)  # before training: a bad --out fails at once
    metrics = train(args)
    acc = metrics["test_accuracy"]
    print(
        f"held-out accuracy {acc:.2%} on {sum(map(sum, metrics['confusion_matrix']))} test digits "
        f"after {args.epochs} epochs in {metrics['seconds']:.1f} s; wrote {metrics['plot']}"
    )
    return 0
