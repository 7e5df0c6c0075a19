"""The README's loop, runnable: an MLP trained sparse by RESU in a plain PyTorch loop.

    python examples/plain_loop.py [--steps 300] [--sparsity 0.7]

The data is synthetic, so the script runs anywhere: inputs drawn from a normal distribution and
labelled by a fixed random "teacher" network, which a student MLP can learn. Copy the loop into
your own code; the one changed line is ``model.resu.step(optimizer)`` in place of
``optimizer.step()``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

import resu_compile as resu

FEATURES, CLASSES, HIDDEN = 32, 8, 128


def make_batch(
    teacher: torch.nn.Module, batch_size: int, generator: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random inputs and the teacher's classes for them."""
    x = torch.randn(batch_size, FEATURES, generator=generator).to(device)
    with torch.no_grad():
        y = teacher(x).argmax(dim=1)
    return x, y


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    parser.add_argument("--sparsity", type=float, default=0.7, help="final sparsity (default 0.7)")
    parser.add_argument("--cycles", type=int, default=3, help="RESU cycles (default 3)")
    parser.add_argument("--batch-size", type=int, default=64, help="minibatch size (default 64)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(
        torch.nn.Linear(FEATURES, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, CLASSES)
    ).to(device)
    model = torch.nn.Sequential(
        torch.nn.Linear(FEATURES, HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, CLASSES),
    ).to(device)

    # Inductor needs a C++ toolchain and compiles slowly on a CPU; aot_eager needs neither.
    compiler = "inductor" if device.type == "cuda" else "aot_eager"
    model = resu.compile(
        model,
        sparsity=args.sparsity,
        cycles=args.cycles,
        total_steps=args.steps,
        compiler=compiler,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    loss_fn = torch.nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(1)

    for step in range(1, args.steps + 1):
        x, y = make_batch(teacher, args.batch_size, generator, device)
        loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        model.resu.step(optimizer)  # instead of optimizer.step()
        if step % max(1, args.steps // 10) == 0 or step == args.steps:
            print(f"step {step:>5}  phase {model.resu.phase.value:<9}  loss {loss.item():.4f}")

    x, y = make_batch(teacher, 1024, generator, device)
    with torch.no_grad():
        held_out = (model(x).argmax(dim=1) == y).float().mean().item()
    print(f"accuracy on 1024 fresh samples: {held_out:.4f}")
    print(model.resu.report())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
