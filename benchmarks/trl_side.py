"""TRL's half of `vs_trl.py`, run by the Python of TRL's own virtual environment (no rayrlhf
imports here): `GRPOTrainer` with HF generate on the given models and prompts, one JSON object
on stdout with each step's seconds and generated tokens.

    python benchmarks/trl_side.py SETTINGS.json
"""

from __future__ import annotations

import json
import sys
import tempfile
import time

import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer


class StepClock(TrainerCallback):
    """Wall seconds of each optimizer step (generation included: TRL generates inside it) and
    the mean completion length TRL logs for it."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.lengths: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "completions/mean_length" in logs:
            self.lengths.append(float(logs["completions/mean_length"]))


def main(path: str) -> None:
    s = json.loads(open(path).read())
    torch.manual_seed(s["seed"])
    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(
            output_dir=out, use_cpu=True, bf16=False, report_to="none", save_strategy="no",
            logging_steps=1, max_steps=s["steps"], seed=s["seed"],
            per_device_train_batch_size=s["batch"], gradient_accumulation_steps=1,
            num_generations=s["samples_per_prompt"], num_iterations=1,
            max_completion_length=s["max_new_tokens"], learning_rate=s["lr"], beta=s["kl_coef"],
            temperature=1.0, disable_dropout=True, dataloader_num_workers=0,
        )  # fmt: skip
        clock = StepClock()
        trainer = GRPOTrainer(
            model=s["policy"], reward_funcs=s["reward"], args=args, callbacks=[clock],
            train_dataset=Dataset.from_dict({"prompt": s["prompts"]}),
        )  # fmt: skip
        trainer.train()
    generated = [m * s["batch"] for m in clock.lengths]
    out = {"step_seconds": clock.seconds, "generated": generated}
    print(json.dumps(out | {"threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main(sys.argv[1])
