"""Stage 5, train: fine-tune the judge on the kept judgments with TRL + PEFT LoRA. Reads the `train` group.

`sft` (the paper): loss on the judgment tokens only (prompt-completion data; TRL masks the prompt).
`dpo` (the released model adds it): a kept correct judgment is preferred over an incorrect judgment of the
same pair and order, plus an optional NLL term on the chosen judgment (`sft_weight`, TRL's "sft" loss). The adapter is the
stage's output; `init_from` chooses whether iteration k+1 starts from the untrained judge (the paper) or
continues from iteration k's adapter. Checkpoints go into the stage's partial directory, so a killed run
resumes training from the last checkpoint.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError, knob
from ..records import TrainExample

log = logging.getLogger(__name__)
VERSION = 1


@dataclass
class TrainConfig:
    method: str = "sft"
    init_from: str = "seed"
    learning_rate: float = knob(1e-3, "peak learning rate", min=0)
    warmup_steps: int = 0
    num_epochs: float = 3
    max_steps: int = -1
    per_device_batch_size: int = knob(2, "examples per device per step", min=1)
    gradient_accumulation_steps: int = knob(1, "steps accumulated per update", min=1)
    max_length: int = knob(1024, "longest example in tokens (longer ones are dropped)", min=1)
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    save_steps: int = 20
    beta: float = 0.1  # dpo: strength of the KL anchor to the initial model
    sft_weight: float = 0.0  # dpo: weight of the NLL term on the chosen judgment (0 = plain DPO)

    def validate(self, where: str) -> None:
        if self.method not in ("sft", "dpo"):
            raise ConfigError(f"{where}.method={self.method!r}: known methods: sft, dpo")
        if self.init_from not in ("seed", "previous"):
            raise ConfigError(f"{where}.init_from={self.init_from!r}: use seed or previous")


def _dataset(examples: list[TrainExample], method: str):
    from datasets import Dataset

    def turn(role: str, text: str) -> list[dict]:
        return [{"role": role, "content": text}]

    if method == "dpo":
        return Dataset.from_list(
            [{"prompt": turn("user", e.prompt), "chosen": turn("assistant", e.completion), "rejected": turn("assistant", e.rejected_completion)}
             for e in examples]
        )
    return Dataset.from_list([{"prompt": turn("user", e.prompt), "completion": turn("assistant", e.completion)} for e in examples])


def run(
    cfg: TrainConfig,
    examples: list[TrainExample],
    model_and_tokenizer,
    previous_adapter: Path | None,
    out_dir: Path,
    seed: int,
    report_to_mlflow: bool,
) -> dict:
    """Train and save the adapter to out_dir/adapter. Returns stats (losses, steps, seconds)."""
    model, tokenizer = model_and_tokenizer
    if cfg.method == "dpo":
        without = sum(e.rejected_completion is None for e in examples)
        if without:
            log.warning("train: method=dpo skips %d/%d examples with no incorrect judgment to prefer against", without, len(examples))
        examples = [e for e in examples if e.rejected_completion is not None]
    fitting = [e for e in examples if _length(tokenizer, e) <= cfg.max_length]
    too_long = len(examples) - len(fitting)
    if too_long:
        # Truncation would cut the end of the completion, i.e. exactly the verdict being taught: drop instead.
        log.warning("train: dropped %d/%d examples longer than train.max_length=%d tokens", too_long, len(examples), cfg.max_length)
    examples = fitting
    if not examples:
        log.warning("train: no examples to train on: this iteration's judge stays the initial model")
        return {"trained": False, "produced": "none", "examples": 0, "dropped_too_long": too_long}
    import torch
    from peft import LoraConfig, PeftModel
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    peft_config = None
    if previous_adapter is not None:
        model = PeftModel.from_pretrained(model, str(previous_adapter), is_trainable=True)
    else:
        peft_config = LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.lora_target_modules), task_type="CAUSAL_LM",
        )
    ckpt_dir = out_dir / "checkpoints"
    common = dict(
        output_dir=str(ckpt_dir),
        learning_rate=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        num_train_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        max_length=cfg.max_length,
        logging_steps=1,
        save_steps=cfg.save_steps,
        save_total_limit=1,
        seed=seed,
        data_seed=seed,
        report_to=["mlflow"] if report_to_mlflow else "none",
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    data = _dataset(examples, cfg.method)
    if cfg.method == "dpo":
        losses = (["sigmoid", "sft"], [1.0, cfg.sft_weight]) if cfg.sft_weight > 0 else (["sigmoid"], [1.0])
        args = DPOConfig(**common, beta=cfg.beta, loss_type=losses[0], loss_weights=losses[1])
        # With a LoRA model TRL uses the adapter-disabled base as the reference: no second copy in memory.
        trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=peft_config)
    else:
        args = SFTConfig(**common, completion_only_loss=True)
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=peft_config)
    resume = any(ckpt_dir.glob("checkpoint-*")) if ckpt_dir.exists() else False
    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=True if resume else None)
    # save_model, not model.save_pretrained: it writes once (main process) and gathers FSDP-sharded weights.
    trainer.save_model(str(out_dir / "adapter"))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    import shutil

    shutil.rmtree(ckpt_dir, ignore_errors=True)  # the adapter is the output; checkpoints were only for resume
    return {
        "trained": True,
        "produced": "adapter",  # what out_dir holds: adapter/ ("adapter"), full weights ("full") or nothing ("none")
        "examples": len(examples),
        "steps": trainer.state.global_step,
        "train_loss": float(result.training_loss) if not math.isnan(result.training_loss) else None,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "losses": losses,
        "seconds": time.time() - t0,
        "resumed": resume,
        "dropped_too_long": too_long,
    }


def _length(tokenizer, e: TrainExample) -> int:
    """Tokens of the longest sequence an example trains on (the rejected side too, for DPO)."""
    longest = max([e.completion, e.rejected_completion or ""], key=len)
    messages = [{"role": "user", "content": e.prompt}, {"role": "assistant", "content": longest}]
    ids = tokenizer.apply_chat_template(messages, tokenize=True)
    return len(ids["input_ids"] if hasattr(ids, "keys") else ids)  # transformers 5 returns a BatchEncoding
