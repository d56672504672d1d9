"""Stage 5, train: fine-tune the judge on the kept judgments with TRL. Reads the `train` group.

`peft=lora` (CPU / single-GPU default) trains a PEFT LoRA adapter, saved as out_dir/adapter; `peft=none` (the paper)
fine-tunes every weight, saved as a whole model directory out_dir/model. The stats say which (`produced`).

`sft` (the paper): loss on the judgment tokens only (prompt-completion data; TRL masks the prompt).
`dpo` (the released model adds it): a kept correct judgment is preferred over an incorrect judgment of the
same pair and order (RAM: also a verdict-less one), plus an optional NLL term on the chosen judgment (`sft_weight`,
TRL's "sft" loss); examples with no such judgment are dropped and A/B balance is restored afterwards, as RAM does.
`init_from` chooses whether iteration k+1 starts from the untrained judge (the paper) or continues from iteration
k's output. Checkpoints go into the stage's partial directory, so a killed run
resumes training from the last checkpoint.
"""
from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from src.cache import CacheError, StageCache, make_key
from src.config import ConfigError, as_dict, knob
from src.models.base import ModelSpec, model_id
from src.records import TrainExample
from src.step import Context, Stage, Step

log = logging.getLogger(__name__)
VERSION = 2  # 2: peft=none (full weights), DPO A/B rebalance, train_loss = mean over all steps after resume
# What a train output's meta records as `stats.produced`, and the directory in the output that holds it.
PRODUCED = {"adapter": "adapter", "full": "model", "none": None}


# transformers' SchedulerType values, written out so that checking a config imports no torch (a dry run and a bad
# config value fail in a second, not after the ~10 s import); tests/unit/test_config_errors.py compares them with it.
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt",
              "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay", "greedy")


@dataclass
class TrainConfig:
    method: str = "sft"
    peft: str = "lora"  # lora: a LoRA adapter; none: full fine-tuning of every weight (the paper)
    init_from: str = "seed"
    learning_rate: float = knob(1e-3, "peak learning rate", gt=0)
    warmup_steps: int = knob(0, "optimizer steps of linear warm-up", min=0)
    lr_scheduler: str = "linear"  # any transformers SchedulerType; RAM: cosine
    weight_decay: float = knob(0.0, "AdamW weight decay; RAM: 0.1", min=0)
    adam_beta2: float = knob(0.999, "AdamW beta2; RAM: 0.95", gt=0, lt=1)
    num_epochs: float = knob(3, "passes over the examples (0 would leave the judge untrained under a trained name)", gt=0)
    max_steps: int = -1
    per_device_batch_size: int = knob(2, "examples per device per step", min=1)
    gradient_accumulation_steps: int = knob(1, "steps accumulated per update", min=1)
    max_length: int = knob(1024, "longest example in tokens (longer ones are dropped)", min=1)
    lora_r: int = knob(8, "LoRA rank", min=1)
    lora_alpha: int = knob(16, "LoRA scale numerator", min=1)
    lora_dropout: float = knob(0.0, "LoRA dropout probability", min=0, lt=1)
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    save_steps: int = knob(20, "optimizer steps between resumable checkpoints", min=1)
    beta: float = knob(0.1, "DPO KL strength", gt=0)  # dpo: strength of the KL anchor to the initial model
    sft_weight: float = knob(0.0, "DPO NLL weight", min=0)  # dpo: weight of the NLL term on the chosen judgment (0 = plain DPO)

    def validate(self, where: str) -> None:
        if self.method not in ("sft", "dpo"):
            raise ConfigError(f"{where}.method={self.method!r}: known methods: sft, dpo")
        if self.peft not in ("lora", "none"):
            raise ConfigError(f"{where}.peft={self.peft!r}: use lora (adapter) or none (full fine-tuning)")
        if self.lr_scheduler not in SCHEDULERS:
            raise ConfigError(f"{where}.lr_scheduler={self.lr_scheduler!r}: one of {', '.join(SCHEDULERS)}")
        if self.init_from not in ("seed", "previous"):
            raise ConfigError(f"{where}.init_from={self.init_from!r}: use seed or previous")


def key(cfg: TrainConfig, examples_key: str, init_key: str | None, model: ModelSpec, iteration: int, random_seed: int,
        world_size: int = 1) -> str:
    """train's key: `train`, the examples, the train output it starts from (init_from=previous), the untrained
    judge, the iteration; and the process count when it is more than one (a larger global batch is another result;
    one process keeps the keys it always had)."""
    world = {"world_size": world_size} if world_size > 1 else {}
    return make_key(
        "train", VERSION, as_dict(cfg), {"examples": examples_key, "init": init_key}, model=model_id(model, None),
        random_seed=random_seed, iteration=iteration, **world,
    )


def weights(cache: StageCache, train_key: str | None) -> Path | None:
    """What a train output holds, as its meta records it: the adapter (or full weights) directory, or None for the
    untrained model (no train key, or an output that recorded `produced: none`). A recorded artifact that is gone
    is an error, never the base model under the trained model's name."""
    if train_key is None:
        return None
    if not cache.valid("train", train_key):
        raise CacheError(f"{cache.path('train', train_key)}: the train output this step needs is missing or damaged; rerun to recompute it")
    stats = cache.meta("train", train_key).get("stats", {})
    # Outputs from before `produced` existed: trained=True meant an adapter.
    produced = stats.get("produced", "adapter" if stats.get("trained") else "none")
    if produced not in PRODUCED:
        raise CacheError(f"{cache.path('train', train_key) / 'meta.json'}: stats.produced={produced!r} is not one of {', '.join(PRODUCED)}")
    if PRODUCED[produced] is None:
        log.warning("train %s produced no weights (no training data): its iteration runs the untrained judge", train_key)
        return None
    path = cache.path("train", train_key) / PRODUCED[produced]
    if not path.exists():
        raise CacheError(f"{path}: recorded as produced ({produced}) but missing")
    return path


def check_output(stats: dict, out_dir: Path, where: str) -> None:
    """Before commit: the stats name what was produced and it is there. PEFT writes `target_modules` from a set, in
    an order that changes with each process's string hashing: sorted, a retrained adapter is byte-identical to the
    first (so the cache manifest can compare them)."""
    import json

    produced = stats.get("produced")
    if produced not in PRODUCED:
        raise RuntimeError(f"{where}: stats['produced']={produced!r}, expected one of {', '.join(PRODUCED)}")
    if PRODUCED[produced] and not (out_dir / PRODUCED[produced]).exists():
        raise RuntimeError(f"{where}: reports produced={produced} but wrote no {out_dir / PRODUCED[produced]}")
    conf_path = out_dir / "adapter" / "adapter_config.json"
    if conf_path.exists():
        conf = json.loads(conf_path.read_text())
        if isinstance(conf.get("target_modules"), list):
            conf["target_modules"] = sorted(conf["target_modules"])
            conf_path.write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
# The training settings that change what is learnt, logged as params of the training child run. TRL's own MLflow
# callback logs every TrainingArguments field and the model config (~170 params, mostly paths, logging and hub
# options); these are the ones a comparison needs. `world_size` x batch x accumulation is the global batch.
LOGGED_ARGS = (
    "learning_rate", "lr_scheduler_type", "warmup_steps", "warmup_ratio", "num_train_epochs", "max_steps",
    "per_device_train_batch_size", "gradient_accumulation_steps", "world_size", "optim", "weight_decay", "adam_beta1",
    "adam_beta2", "adam_epsilon", "max_grad_norm", "max_length", "seed", "bf16", "fp16", "gradient_checkpointing",
    "completion_only_loss", "beta", "loss_type", "loss_weights",
)
LOGGED_PEFT = ("r", "lora_alpha", "lora_dropout", "target_modules")


def training_params(args: dict, peft_config=None) -> dict:
    """The params a training child run carries: LOGGED_ARGS from the trainer's arguments (`args.to_dict()` plus
    world_size) and, for a LoRA model, its rank, alpha, dropout and target modules as `peft.*`."""
    out = {k: args[k] for k in LOGGED_ARGS if k in args and args[k] is not None}
    if peft_config is not None:
        for k in LOGGED_PEFT:
            v = getattr(peft_config, k, None)
            out[f"peft.{k}"] = sorted(v) if isinstance(v, (set, list)) else v
    return out


def _mlflow_callback():
    """transformers' MLflowCallback (the same run handling: the open training child run, or MLFLOW_RUN_ID in a
    launched worker; the same per-step metrics), logging `training_params` instead of every argument."""
    from transformers.integrations import MLflowCallback

    class _Args:
        """The trainer's arguments as MLflowCallback.setup reads them, with to_dict() pruned."""

        def __init__(self, args, params):
            self._args, self._params = args, params

        def __getattr__(self, name):
            return getattr(self._args, name)

        def to_dict(self):
            return self._params

    class PrunedMLflowCallback(MLflowCallback):
        def setup(self, args, state, model):
            peft = getattr(model, "peft_config", None) or {}
            params = training_params({**args.to_dict(), "world_size": args.world_size}, next(iter(peft.values()), None))
            super().setup(_Args(args, params), state, None)  # no model: its config is not a training setting

    return PrunedMLflowCallback()


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
    """Train and save out_dir/adapter (peft=lora) or out_dir/model (peft=none). `previous_adapter` is what the
    previous iteration's train stage produced (either kind) for init_from=previous, else None. Returns stats
    (losses, steps, seconds, `produced`: adapter | full | none)."""
    model, tokenizer = model_and_tokenizer
    rebalanced = 0
    if cfg.method == "dpo":
        without = sum(e.rejected_completion is None for e in examples)
        if without:
            log.warning("train: method=dpo skips %d/%d examples with no incorrect judgment to prefer against", without, len(examples))
        with_rejected = [e for e in examples if e.rejected_completion is not None]
        # The filter balanced A/B before this drop; RAM balances among the examples that have a negative.
        examples = balance_ab(with_rejected, seed)
        rebalanced = len(with_rejected) - len(examples)
    fitting = [e for e in examples if _length(tokenizer, e) <= cfg.max_length]
    too_long = len(examples) - len(fitting)
    if too_long:
        # Truncation would cut the end of the completion, i.e. exactly the verdict being taught: drop instead.
        log.warning("train: dropped %d/%d examples longer than train.max_length=%d tokens", too_long, len(examples), cfg.max_length)
    examples = fitting
    if not examples:
        log.warning("train: no examples to train on: this iteration's judge stays the initial model")
        return {"trained": False, "produced": "none", "examples": 0, "dropped_too_long": too_long}
    from peft import LoraConfig, PeftModel
    from trl import DPOTrainer, SFTTrainer

    peft_config = None
    if previous_adapter is not None and is_full_model(previous_adapter):
        if cfg.peft == "lora":
            raise ConfigError(f"train.init_from=previous with train.peft=lora: the previous iteration produced full weights ({previous_adapter}), not an adapter")
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(previous_adapter), dtype=model.dtype)
    elif previous_adapter is not None:
        if cfg.peft == "none":
            raise ConfigError(f"train.init_from=previous with train.peft=none: the previous iteration produced a LoRA adapter ({previous_adapter})")
        model = PeftModel.from_pretrained(model, str(previous_adapter), is_trainable=True)
    elif cfg.peft == "lora":
        peft_config = LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.lora_target_modules), task_type="CAUSAL_LM",
        )
    ckpt_dir = out_dir / "checkpoints"
    args = training_arguments(cfg, ckpt_dir, seed, os.environ)
    data = _dataset(examples, cfg.method)
    callbacks = [_mlflow_callback()] if report_to_mlflow else None
    if cfg.method == "dpo":
        # With a LoRA model TRL uses the adapter-disabled base as the reference: no second copy in memory. A full
        # fine-tune gets a frozen copy of the starting model as reference (TRL loads it), as RAM's recipe does.
        trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=peft_config,
                             callbacks=callbacks)
    else:
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=peft_config,
                             callbacks=callbacks)
    resume = resumable_checkpoint(ckpt_dir)
    t0 = time.time()
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    # save_model, not model.save_pretrained: it writes once (main process) and gathers FSDP-sharded weights
    # (save_output). With a full fine-tune (peft=none) it writes a whole model directory (weights + the tokenizer,
    # TRL's processing_class) that load_generator and vLLM load like any model.
    produced = "adapter" if cfg.peft == "lora" else "full"
    saved = out_dir / ("adapter" if produced == "adapter" else "model")
    save_output(trainer, saved, full=produced == "full")
    # save_model also pickles the TrainingArguments, paths of this attempt included: not needed to load the
    # weights, and it would make a retrained output differ byte for byte from the first (the cache compares them).
    if trainer.is_world_process_zero():
        (saved / "training_args.bin").unlink(missing_ok=True)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    import shutil

    shutil.rmtree(ckpt_dir, ignore_errors=True)  # the output is saved; checkpoints were only for resume
    return {
        "trained": True,
        "produced": produced,  # what out_dir holds: adapter/ ("adapter"), model/ ("full") or nothing ("none")
        "examples": len(examples),
        "steps": trainer.state.global_step,
        # TRL's result.training_loss after a resume divides the post-resume losses by ALL steps (issue 9). The
        # restored log_history has one entry per optimizer step (logging_steps=1), before and after the resume.
        "train_loss": sum(losses) / len(losses) if losses else None,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "losses": losses,
        "seconds": time.time() - t0,
        "resumed": resume is not None,
        "dropped_too_long": too_long,
        "dropped_unbalanced": rebalanced,
    }


def training_arguments(cfg: TrainConfig, ckpt_dir: Path, seed: int, env, on_gpu: bool | None = None):
    """The TRL config (SFTConfig or DPOConfig) a train stage builds its trainer with, in the environment `env` that
    `accelerate launch` gives each process (os.environ in this process), on a GPU or not (default: this machine).
    A function so a CPU test can build it for every `launch` option as the GPU run will."""
    import torch
    from trl import DPOConfig, SFTConfig

    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu

    common = dict(
        output_dir=str(ckpt_dir),
        learning_rate=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        lr_scheduler_type=cfg.lr_scheduler,
        weight_decay=cfg.weight_decay,
        adam_beta2=cfg.adam_beta2,
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
        report_to="none",  # MLflow through _mlflow_callback (pruned params)
        use_cpu=not on_gpu,
        bf16=on_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        dataloader_num_workers=0,
        disable_tqdm=False,
        gradient_checkpointing=gradient_checkpointing(env, on_gpu),
    )
    if cfg.method == "dpo":
        losses = (["sigmoid", "sft"], [1.0, cfg.sft_weight]) if cfg.sft_weight > 0 else (["sigmoid"], [1.0])
        return DPOConfig(**common, beta=cfg.beta, loss_type=losses[0], loss_weights=losses[1])
    return SFTConfig(**common, completion_only_loss=True)


def gradient_checkpointing(env, on_gpu: bool = True) -> bool:
    """Whether the trainer recomputes activations itself (`TrainingArguments.gradient_checkpointing`).

    Off on CPU: there memory is not what binds a LoRA run of these models, and the recompute is more
    compute per step (scripts/bench_train_step.py, SmolLM2-135M, LoRA r=8, 2 x 484 tokens: 9.35 s/step on, 8.02 off
    with eager attention; docs/training-and-launch.md). Recomputed activations are the same values, so this changes no result and no key.

    TRL 1.16 turns it on by default (`trl/trainer/base_config.py`). Under an FSDP launch with activation
    checkpointing (`launch.activation_checkpointing`, which `accelerate launch` passes to every process as
    FSDP_ACTIVATION_CHECKPOINTING), FSDP wraps each decoder layer in its own checkpoint, and transformers refuses
    both at once when the Trainer is built (`trainer.py`: "The activation_checkpointing in FSDP config and the
    gradient_checkpointing in training arg can't be set to True simultaneously"). FSDP's does the job there; every
    other launch on a GPU keeps TRL's default."""
    from accelerate.utils import str_to_bool

    if not on_gpu:
        return False
    fsdp = str_to_bool(env.get("ACCELERATE_USE_FSDP", "false")) == 1
    fsdp_checkpointing = str_to_bool(env.get("FSDP_ACTIVATION_CHECKPOINTING", "false")) == 1
    return not (fsdp and fsdp_checkpointing)


def save_output(trainer, saved: Path, full: bool) -> None:
    """The trained weights as a from_pretrained directory, `trainer.save_model` on every process.

    Under FSDP the checkpoints during training are sharded (SHARDED_STATE_DICT, src/launch.py: accelerate_config),
    and transformers' save_model (5.17) writes nothing then: it saves only under FULL_STATE_DICT, through
    accelerate's `get_state_dict` (the whole model gathered into rank 0's CPU memory, once). So the plugin is switched
    to FULL_STATE_DICT for this one save. The gathered state is what FSDP trains, fp32 (accelerate upcasts the
    sharded parameters under mixed precision: ~282 GB for Llama-3-70B); a full fine-tune trained in bf16 is written
    in bf16 (141 GB), and its config says so (save_pretrained records the dtype of the fp32 parameters). A LoRA
    adapter keeps its dtype (a few MB). Without FSDP (CPU, one GPU) this is plain save_model, unchanged."""
    if not getattr(trainer, "is_fsdp_enabled", False):
        trainer.save_model(str(saved))
        return
    import json

    import torch
    from torch.distributed.fsdp import StateDictType

    plugin = trainer.accelerator.state.fsdp_plugin
    if plugin.state_dict_type != StateDictType.FULL_STATE_DICT:
        plugin.state_dict_config = plugin.optim_state_dict_config = None  # set_state_dict_type fills only empty ones
        plugin.set_state_dict_type("FULL_STATE_DICT")
    to_bf16 = full and trainer.args.bf16
    if not to_bf16:
        trainer.save_model(str(saved))
        return
    state = trainer.accelerator.get_state_dict(trainer.model)  # collective: every rank; the tensors land on rank 0
    if trainer.args.should_save:
        for k, v in state.items():  # one tensor at a time: rank 0 never holds a second full copy
            if v.is_floating_point():
                state[k] = v.to(torch.bfloat16)
        trainer._save(str(saved), state_dict=state)
        conf = saved / "config.json"
        c = json.loads(conf.read_text())
        c["dtype"] = "bfloat16"
        conf.write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")
    del state
    trainer.accelerator.wait_for_everyone()


def checkpoint_complete(path: Path) -> bool:
    """A Trainer checkpoint that a resume can load: transformers writes trainer_state.json after the weights, the
    optimizer, scheduler and RNG state (trainer.py `_save_checkpoint`), so one that parses means the save finished. A
    save cut by a full disk or a kill leaves it missing or truncated (a 4 KB optimizer.pt and no state, measured).

    An FSDP checkpoint (SHARDED_STATE_DICT) holds the weights and the optimizer state as torch.distributed.checkpoint
    directories, `pytorch_model_fsdp_0/` and `optimizer_0/` (accelerate's save_fsdp_model / save_fsdp_optimizer),
    each one `__<rank>_0.distcp` file per rank and a `.metadata` the coordinator writes last, naming every file. A
    resume needs both (transformers looks for a `pytorch_model_fsdp*` directory to call it an FSDP checkpoint, and
    skips the optimizer silently when `optimizer*` is missing): a sharded checkpoint is complete when both are there
    and every file its metadata names exists (a copy or a sync that lost one rank's shard is not)."""
    import json

    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    if not (isinstance(state, dict) and "global_step" in state):
        return False
    sharded = sorted(p for p in path.glob("pytorch_model_fsdp_*") if p.is_dir())
    if not sharded:
        return True  # one process, DDP or FULL_STATE_DICT: the files trainer_state.json came after
    optimizers = sorted(p for p in path.glob("optimizer_*") if p.is_dir()) or [path / "optimizer_0"]  # none: incomplete
    return all(_dcp_complete(d) for d in [*sharded, *optimizers])


def _dcp_complete(d: Path) -> bool:
    """A torch.distributed.checkpoint directory with its `.metadata` and every file that metadata names."""
    if not (d / ".metadata").is_file():
        return False
    from torch.distributed.checkpoint import FileSystemReader

    try:
        meta = FileSystemReader(str(d)).read_metadata()
    except Exception:  # a truncated or unreadable .metadata: the save was cut
        return False
    files = {info.relative_path for info in (meta.storage_data or {}).values()}
    return all((d / f).is_file() for f in files)


def resumable_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete `checkpoint-<step>` under ckpt_dir, or None (train from the start). Incomplete ones are
    skipped with a warning naming them: resuming from one fails on every rerun (FileNotFoundError) until deleted."""
    if not ckpt_dir.is_dir():
        return None
    found = sorted((p for p in ckpt_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-", 1)[1].isdigit()),
                   key=lambda p: int(p.name.split("-", 1)[1]), reverse=True)
    for p in found:
        if checkpoint_complete(p):
            return p
        log.warning("train: %s is an incomplete checkpoint (no readable trainer_state.json, or a sharded part "
                    "without its .metadata or a shard file: its save was cut); "
                    "resuming from an earlier one or from the start", p)
    return None


def is_full_model(path: Path) -> bool:
    """A train output that is a whole model directory (peft=none), not a LoRA adapter."""
    return (Path(path) / "config.json").is_file() and not (Path(path) / "adapter_config.json").is_file()


def balance_ab(examples: list[TrainExample], seed: int) -> list[TrainExample]:
    """Equal numbers of "A better" and "B better" examples: a seeded random subset of the larger side."""
    a = [e for e in examples if e.verdict == "A"]
    b = [e for e in examples if e.verdict == "B"]
    n = min(len(a), len(b))
    rng = random.Random(seed)
    keep = {id(e) for e in rng.sample(a, n) + rng.sample(b, n)}
    return [e for e in examples if id(e) in keep]


def _length(tokenizer, e: TrainExample) -> int:
    """Tokens of the longest sequence an example trains on (the rejected side too, for DPO)."""
    longest = max([e.completion, e.rejected_completion or ""], key=len)
    messages = [{"role": "user", "content": e.prompt}, {"role": "assistant", "content": longest}]
    ids = tokenizer.apply_chat_template(messages, tokenize=True)
    return len(ids["input_ids"] if hasattr(ids, "keys") else ids)  # transformers 5 returns a BatchEncoding


@dataclass(frozen=True)
class TrainStep:
    """The step's config: the `train` group and the `launch` group (processes and nodes it trains on)."""

    train: TrainConfig
    launch: Any  # src.launch.LaunchConfig (the launcher sits above the stages; its config is only carried here)


def execute(step: Step, ctx: Context) -> tuple[None, dict]:
    """Train through the launcher (`ctx.train`: the generation engines closed first) from the weights `step.init`
    names, into the partial output; checked before it is committed."""
    examples = ctx.inputs()["examples"]
    stats = ctx.train(step.config.launch, step.config.train, examples, weights(ctx.cache, step.init), ctx.partial.dir)
    check_output(stats, ctx.partial.dir, f"train[iter {step.iteration}]")
    return None, stats


def logged_stats(stats: dict) -> dict:
    return {"train/loss": stats.get("train_loss"), "train/first_loss": stats.get("first_loss"), "train/last_loss": stats.get("last_loss"),
            "train/steps": stats.get("steps"), "train/examples": stats.get("examples"), "train/trained": float(bool(stats.get("trained"))),
            "train/dropped_too_long": stats.get("dropped_too_long"), "train/dropped_unbalanced": stats.get("dropped_unbalanced")}


STAGES = {"train": Stage(execute, config_part=lambda c: as_dict(c.train), logged=logged_stats, weights=True)}
