"""RESU under the HF ``Trainer``: a tiny byte-level GPT-2 trained on an embedded text.

    pip install -e ".[hf]" && python examples/hf_trainer.py

The whole integration is ``callbacks=[ResuCallback(sparsity=..., ...)]``: the schedule spans the
Trainer's ``max_steps``, and every ``checkpoint-N/`` loads with ``from_pretrained`` as the sparse
model (pruned weights exactly zero). With the defaults it takes about 20 s of CPU time.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from resu_compile.integrations.transformers import ResuCallback

TEXT = (
    "In the beginning God created the heaven and the earth. And the earth was without form, "
    "and void; and darkness was upon the face of the deep. And the Spirit of God moved upon the "
    "face of the waters. And God said, Let there be light: and there was light. And God saw the "
    "light, that it was good: and God divided the light from the darkness. And God called the "
    "light Day, and the darkness he called Night. And the evening and the morning were the first "
    "day. "
)


class ByteBlocks(torch.utils.data.Dataset):
    """Overlapping blocks of the text's bytes (vocabulary 256), next-byte targets."""

    def __init__(self, text: str, block: int) -> None:
        self.data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
        self.block = block

    def __len__(self) -> int:
        return len(self.data) - self.block

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.data[i : i + self.block]
        return {"input_ids": ids, "labels": ids}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps (max_steps)")
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--cycles", type=int, default=2)
    parser.add_argument(
        "--compiler",
        default="inductor" if torch.cuda.is_available() else "eager",
        help="inner compiler (default: inductor on a GPU, eager on a CPU, where compile time would dominate)",
    )
    parser.add_argument("--output-dir", default=None, help="default: a temporary directory")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=256,
            n_positions=64,
            n_embd=64,
            n_layer=2,
            n_head=4,
            bos_token_id=0,
            eos_token_id=0,
        )
    )
    with tempfile.TemporaryDirectory() as scratch:
        output_dir = args.output_dir or scratch
        trainer = Trainer(
            model=model,
            args=TrainingArguments(
                output_dir,
                max_steps=args.steps,
                per_device_train_batch_size=8,
                learning_rate=3e-3,
                save_steps=args.steps // 2,
                logging_steps=max(1, args.steps // 6),
                report_to=[],
                use_cpu=not torch.cuda.is_available(),
                disable_tqdm=True,
            ),
            train_dataset=ByteBlocks(TEXT, block=32),
            callbacks=[
                ResuCallback(sparsity=args.sparsity, cycles=args.cycles, compiler=args.compiler)
            ],
        )
        trainer.train()
        print(model.resu.telemetry(totals_only=True))

        checkpoint = f"{output_dir}/checkpoint-{args.steps // 2}"
        sparse = GPT2LMHeadModel.from_pretrained(checkpoint)
        zeros = sum(int((sparse.get_parameter(name) == 0).sum()) for name in model.resu.masks())
        total = sum(sparse.get_parameter(name).numel() for name in model.resu.masks())
        print(f"from_pretrained({checkpoint}): {zeros / total:.3f} of the managed weights are zero")


if __name__ == "__main__":
    main()
