"""A convolutional network trained sparse by RESU: torchvision's (or timm's) ResNet-18 when
installed, else a small CNN of this file.

    python examples/cnn.py [--model auto|resnet18|small] [--steps 100]

The images are synthetic (3x32x32, each class a fixed random pattern plus noise), so the script
runs anywhere. Which weights RESU manages is the pass's decision: the report at the end lists
them, and every skipped candidate with its reason.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

import resu_compile as resu

CLASSES, SIZE = 10, 32


class SmallCNN(torch.nn.Sequential):
    """Two convolution blocks and a two-layer classifier head, for 3x32x32 images."""

    def __init__(self, classes: int = CLASSES) -> None:
        super().__init__(
            torch.nn.Conv2d(3, 16, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(16, 32, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Flatten(),
            torch.nn.Linear(32 * (SIZE // 4) ** 2, 64),
            torch.nn.ReLU(),
            torch.nn.Linear(64, classes),
        )


def resnet18() -> torch.nn.Module | None:
    """ResNet-18 for ``CLASSES`` classes from torchvision, else timm; ``None`` without either."""
    try:
        import torchvision
    except ImportError:
        pass
    else:
        return torchvision.models.resnet18(num_classes=CLASSES)
    try:
        import timm
    except ImportError:
        return None
    return timm.create_model("resnet18", pretrained=False, num_classes=CLASSES)


def build(name: str) -> tuple[str, torch.nn.Module]:
    """The model ``--model`` asks for, and the name it is reported under."""
    if name in ("auto", "resnet18"):
        model = resnet18()
        if model is not None:
            return "resnet18", model
        if name == "resnet18":
            raise SystemExit("--model resnet18 needs torchvision or timm: pip install torchvision")
    return "small CNN", SmallCNN()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        choices=["auto", "resnet18", "small"],
        default="auto",
        help="auto (default): resnet18 when torchvision or timm is installed, else small",
    )
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    parser.add_argument("--sparsity", type=float, default=0.7, help="final sparsity (default 0.7)")
    parser.add_argument("--batch-size", type=int, default=32, help="minibatch size (default 32)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    name, model = build(args.model)
    model = model.to(device)
    patterns = torch.randn(CLASSES, 3, SIZE, SIZE, device=device)

    # Inductor needs a C++ toolchain and compiles slowly on a CPU; aot_eager needs neither.
    compiler = "inductor" if device.type == "cuda" else "aot_eager"
    model = resu.compile(
        model, sparsity=args.sparsity, cycles=2, total_steps=args.steps, compiler=compiler
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    print(f"{name}, {sum(p.numel() for p in model.parameters()):,} parameters, on {device}")

    for step in range(1, args.steps + 1):
        y = torch.randint(CLASSES, (args.batch_size,), device=device)
        x = patterns[y] + torch.randn(args.batch_size, 3, SIZE, SIZE, device=device)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        model.resu.step(optimizer)
        if step % max(1, args.steps // 5) == 0 or step == args.steps:
            print(f"step {step:>5}  phase {model.resu.phase.value:<9}  loss {loss.item():.4f}")

    print(model.resu.report())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
