"""Retraining a pruned model with the Hugging Face Trainer: LoRA, full continued pretraining, or distillation.

Because the loop is the Trainer's, the same call scales out with `accelerate launch` or `torchrun` (DDP, FSDP,
DeepSpeed). Checkpoints go to `<out>.checkpoints` next to the output, so an interrupted run resumes from
there (`resume=True`); the output directory itself appears only when the run is complete, holding a standard
checkpoint (LoRA adapters merged) and retraining.json (method, data, steps, losses, time).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from shortened.converter.partial import freeze_for_partial, neighbour_blocks, partial_trainer_class, pruning_record
from shortened.converter.retrain_data import (
    IGNORE,
    Collator,
    ExampleDataset,
    build_examples,
    check_local_data,
    split_heldout,
)
from shortened.errors import UsageError
from shortened.io import atomic_dir, check_no_overlap, check_output_dir, output_key, up_to_date, write_json
from shortened.model.checkpoint import save_checkpoint
from shortened.model.loading import LoadOptions, check_length, load_config, load_model
from shortened.options import check, option

log = logging.getLogger(__name__)

METHODS = ("lora", "full", "distill", "partial")  # partial: only the blocks next to each removed run (partial.py)
DEFAULT_LR = {"lora": 1e-4, "full": 1e-4}  # the paper's LoRA and continued-pretraining learning rates


def _targets(text: str):
    """--lora-targets: all-linear, or a comma list of module names."""
    return [t for t in text.split(",") if t] if "," in text else text


@dataclass
class RetrainConfig:
    """Every retraining option; `shortened retrain` has a flag for each (cli.args.add_options)."""

    method: str = option("lora", "lora (paper, light pruning), full (continued pretraining), distill (teacher = "
                         "original model), partial (only the blocks next to each removed run)",
                         choices=METHODS)  # fmt: skip
    # data
    data: str | None = option(None, "training data: .txt (plain text), .jsonl (text field or Alpaca records), or "
                              "hf:DATASET[:CONFIG]")  # fmt: skip
    val_data: str | None = option(None, "validation data (default: a held-out part of --data)")
    val_fraction: float = option(0.05, "held-out fraction of --data for the validation loss")
    data_format: str = option("auto", "auto, text (packed windows) or alpaca (prompt tokens masked out of the loss)",
                              choices=("auto", "text", "alpaca"))  # fmt: skip
    text_field: str = option("text", "the text field of .jsonl records and datasets")
    split: str = option("train", "dataset split (hf: sources)")
    seq_len: int = option(256, "tokens per training window / example")
    add_bos: bool = option(False, "BOS at the start of every window / example (Gemma)")
    train_on_prompt: bool = option(False, "alpaca: keep the prompt tokens in the loss")
    max_examples: int | None = option(None, "at most this many training examples (after the held-out split)")
    max_val_examples: int | None = option(200, "at most this many validation examples")
    # optimisation (AdamW)
    max_steps: int = option(-1, "optimizer steps (overrides --epochs)")
    epochs: float = option(1.0, "passes over the training data")
    max_minutes: float = option(0.0, "stop after this many minutes of training (0: no limit), validating and saving "
                                "that last step; pair it with --scheduler constant", min=0)  # fmt: skip
    batch_size: int = option(4, "examples per device per step", min=1)
    grad_accum: int = option(1, "gradient accumulation steps", min=1)
    lr: float | None = option(None, "learning rate (default 1e-4; distill: that of its weights)")
    weight_decay: float | None = option(None, "AdamW weight decay (default 0.1 for full weights, 0 for LoRA)")
    warmup_ratio: float = option(0.03, "fraction of the steps spent warming up the learning rate")
    scheduler: str = option("cosine", "learning-rate schedule (a transformers scheduler name)")
    max_grad_norm: float = option(1.0, "gradient clipping norm")
    bf16: bool | None = option(None, "bf16 mixed precision: auto (where the GPU supports it), on, off")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass (less memory)")
    eval_steps: int = option(50, "validate and checkpoint every N steps; the best-validation checkpoint is kept",
                             min=1)  # fmt: skip
    logging_steps: int = option(10, "log the training loss every N steps", min=1)
    save_total_limit: int = option(2, "checkpoints kept in <out>.checkpoints")
    seed: int = option(0, "seed for data order and initialisation")
    # LoRA (paper defaults)
    lora_rank: int = option(8, "LoRA rank", min=1)
    lora_alpha: int = option(16, "LoRA alpha (scale alpha / rank)")
    lora_dropout: float = option(0.05, "LoRA dropout")
    lora_targets: str | list[str] = option("all-linear", "modules to adapt: all-linear (every attention and MLP "
                                           "projection, not lm_head) or a comma list", parse=_targets)  # fmt: skip
    # distillation
    teacher: str | None = option(None, "distill: the original model (default: source_model in the pruned model's "
                                 "pruning.json)")  # fmt: skip
    distill_weights: str = option("full", "distill: train full weights or LoRA adapters", choices=("lora", "full"))
    temperature: float = option(2.0, "distill: softmax temperature of KL(teacher || student)")
    kd_weight: float = option(1.0, "distill: weight of KL(teacher || student)")
    ce_weight: float = option(0.0, "distill: weight of the optional cross-entropy on the data")
    # partial: also the final norm and head; weight of the MSE to the original's hidden state at the same depth
    partial_head: bool = option(False, "partial: also train the final norm and the head")
    partial_mse: float = option(0.0, "partial: weight of the MSE to the original model's hidden state at the same "
                                "depth")  # fmt: skip
    # run
    resume: bool = option(False, "continue an interrupted run from its last checkpoint (<out>.checkpoints)")
    keep_checkpoints: bool = option(False, "keep <out>.checkpoints after a successful run")
    load: LoadOptions = option(default_factory=LoadOptions, cli=False)
    extra_args: dict = option(default_factory=dict, cli=False)  # passed to TrainingArguments as is (fsdp, deepspeed)

    @property
    def weights(self) -> str:
        """What is trained: lora or full."""
        if self.method == "partial":
            return "full"
        return self.distill_weights if self.method == "distill" else self.method

    def validate(self) -> None:
        """Types, choices and minimums (options.check, naming the flags), then what one field cannot say."""
        check(self, flags=True)
        if not self.data:
            raise UsageError("retraining needs data: pass --data FILE (.txt, .jsonl) or a dataset name (hf:NAME)")
        if self.max_steps == 0 or self.max_steps < -1:
            raise UsageError(f"--max-steps must be at least 1 (or -1: train --epochs), got {self.max_steps}")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise UsageError("say how long to train: --max-steps N or --epochs E (> 0)")
        if self.temperature <= 0:
            raise UsageError(f"--temperature must be positive, got {self.temperature}")
        if self.method == "distill" and self.kd_weight <= 0 and self.ce_weight <= 0:
            raise UsageError("distillation needs --kd-weight or --ce-weight above 0")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["load"] = asdict(self.load)
        return d


def checkpoints_dir(out: str | Path) -> Path:
    out = Path(out).resolve()
    return out.with_name(f"{out.name}.checkpoints")


# ---------------------------------------------------------------------------------------------
# Distillation loss and trainer


def distill_loss(student_logits, teacher_logits, labels, temperature=2.0, kd_weight=1.0, ce_weight=0.0):
    """(loss, kl, ce): KL(teacher || student) on the next-token distributions at temperature T (scaled by T^2,
    mean over the positions that have a label), plus ce_weight * cross-entropy on the labels."""
    import torch.nn.functional as F

    y = labels[:, 1:]
    keep = y != IGNORE
    s = student_logits[:, :-1][keep].float()
    t = teacher_logits[:, :-1][keep].float()
    log_ps = F.log_softmax(s / temperature, dim=-1)
    log_pt = F.log_softmax(t / temperature, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean() * temperature**2
    ce = F.cross_entropy(s, y[keep])
    return kd_weight * kl + ce_weight * ce, kl, ce


def _distill_trainer_class():
    import torch
    from transformers import Trainer

    class DistillTrainer(Trainer):
        """The Trainer with the loss replaced by distill_loss against a frozen teacher."""

        def __init__(self, *args, teacher, temperature, kd_weight, ce_weight, **kwargs):
            super().__init__(*args, **kwargs)
            self.teacher = teacher.to(self.args.device).eval().requires_grad_(False)
            self.temperature, self.kd_weight, self.ce_weight = temperature, kd_weight, ce_weight
            self.model_accepts_loss_kwargs = False  # the loss is a per-batch mean: let the Trainer scale it
            self._parts = {"kl": [], "ce": []}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            x = {k: inputs[k] for k in ("input_ids", "attention_mask")}
            out = model(**x, use_cache=False)
            with torch.no_grad():
                t = self.teacher(**x, use_cache=False).logits
            loss, kl, ce = distill_loss(
                out.logits, t, inputs["labels"], self.temperature, self.kd_weight, self.ce_weight
            )
            if model.training:
                self._parts["kl"].append(float(kl.detach()))
                self._parts["ce"].append(float(ce.detach()))
            return (loss, out) if return_outputs else loss

        def log(self, logs, *args, **kwargs):
            if "loss" in logs and self._parts["kl"]:
                for k, v in self._parts.items():
                    logs[k] = round(sum(v) / len(v), 4)
                    v.clear()
            super().log(logs, *args, **kwargs)

    return DistillTrainer


def _final_step_callback():
    from transformers import TrainerCallback

    class EvaluateLastStep(TrainerCallback):
        """Validate and checkpoint the last step too, so the best-checkpoint choice sees the end of training."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_evaluate = True
                control.should_save = True
            return control

    return EvaluateLastStep()


def _time_budget_callback(minutes: float):
    from transformers import TrainerCallback

    class TimeBudget(TrainerCallback):
        """--max-minutes: stop once the training time is spent; the step it stops at is validated and saved."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if time.perf_counter() - self.t0 > minutes * 60:
                log.info("--max-minutes %g reached at step %d", minutes, state.global_step)
                control.should_training_stop = control.should_evaluate = control.should_save = True
            return control

    return TimeBudget()


def _initial_val_callback(path: Path):
    from transformers import TrainerCallback

    class KeepInitialValLoss(TrainerCallback):
        """The validation loss before training (eval_on_start), kept on disk so that a resumed run reports it.

        Evaluated inside train(), not by a trainer.evaluate() before it: that call registers the bare model with
        accelerate, which then skips the DDP wrapping, and every rank trains alone (found under torchrun)."""

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if state.global_step == 0 and state.is_world_process_zero and metrics and "eval_loss" in metrics:
                write_json(path, {"loss": float(metrics["eval_loss"])})

    return KeepInitialValLoss()


# ---------------------------------------------------------------------------------------------


def _find_teacher(model_source: str, cfg: RetrainConfig) -> str:
    if cfg.teacher:
        return cfg.teacher
    rec = Path(model_source) / "pruning.json"
    if rec.is_file():
        src = json.loads(rec.read_text()).get("source_model")
        if src and (Path(src).exists() or "/" in src):
            return src
    raise UsageError("distill needs the original model as teacher: pass --teacher MODEL")


def _training_args(cfg: RetrainConfig, work: Path, has_val: bool):
    import torch
    from transformers import TrainingArguments

    bf16 = cfg.bf16
    if bf16 is None:
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    lr = cfg.lr if cfg.lr is not None else DEFAULT_LR[cfg.weights]
    wd = cfg.weight_decay if cfg.weight_decay is not None else (0.1 if cfg.weights == "full" else 0.0)
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    warmup = {"warmup_ratio": cfg.warmup_ratio} if "warmup_ratio" in names else {"warmup_steps": cfg.warmup_ratio}
    kw = dict(
        output_dir=str(work),
        max_steps=cfg.max_steps if cfg.max_steps > 0 else -1,
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=lr,
        weight_decay=wd,
        lr_scheduler_type=cfg.scheduler,
        max_grad_norm=cfg.max_grad_norm,
        optim="adamw_torch",
        bf16=bool(bf16),
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        logging_steps=cfg.logging_steps,
        eval_strategy="steps" if has_val else "no",
        eval_steps=cfg.eval_steps,
        save_strategy="steps",
        save_steps=cfg.eval_steps,
        save_total_limit=cfg.save_total_limit,
        load_best_model_at_end=has_val,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        seed=cfg.seed,
        data_seed=cfg.seed,
        remove_unused_columns=False,
        report_to="none",
        dataloader_num_workers=0,
        **warmup,
    )
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        kw["use_cpu"] = True  # accelerate starts a gloo process group on CPU only when told (else: N lone runs)
    bad = sorted(set(cfg.extra_args) - names)
    if bad:
        raise UsageError(f"unknown TrainingArguments fields {', '.join(bad)}; see transformers.TrainingArguments")
    kw.update(cfg.extra_args)
    return TrainingArguments(**kw), lr, wd, bool(bf16)


def _losses(history: list[dict]) -> dict:
    train = [{"step": h["step"], "loss": h["loss"], **{k: h[k] for k in ("kl", "ce", "mse") if k in h}} for h in history
             if "loss" in h]  # fmt: skip
    val = [{"step": h["step"], "loss": h["eval_loss"]} for h in history if "eval_loss" in h and h["step"] > 0]
    return {"train": train, "val": val}


def retrain(
    model: str,
    out: str | Path,
    method: str | None = None,
    data: str | None = None,
    teacher: str | None = None,
    config: RetrainConfig | None = None,
    force: bool = False,
    callbacks: list | tuple = (),
    progress: bool = True,
    **options,
) -> dict:
    """Retrain `model` (a pruned checkpoint directory or hub id) and write a standard checkpoint to `out`.

    Options are RetrainConfig fields, given as a config, as keywords, or both (keywords win). Returns the
    record also written to out/retraining.json.
    """
    cfg = _merged_config(config, options, method=method, data=data, teacher=teacher)
    inputs = {"model": model, "teacher": cfg.teacher, "data": cfg.data, "validation data": cfg.val_data}
    key = output_key(inputs, _settings(model, cfg))
    if (done := up_to_date(out, key, force)) is not None:
        return done
    out = check_output_dir(out, force, inputs)
    work = checkpoints_dir(out)
    resuming = _check_resume(model, work, cfg, inputs, force)
    pairs, teacher_src = _partial_pairs_and_teacher(model, out, cfg)
    if resuming:
        _check_same_options(work, cfg)
    check_local_data(cfg.data, cfg.data_format, cfg.text_field)
    check_local_data(cfg.val_data, cfg.data_format, cfg.text_field)

    loaded = load_model(model, cfg.load)
    train_ex, val_ex, data_desc = _examples(cfg, loaded.tokenizer)
    net, lora, counts = _wrap_model(loaded.model, cfg, pairs)
    trainer, hyper = _trainer(net, loaded.tokenizer, cfg, work, train_ex, val_ex, pairs, teacher_src, callbacks,
                              progress)  # fmt: skip
    run = _train(trainer, work, resuming, has_val=bool(val_ex))
    final = _gathered_model(trainer, loaded.model.config, cfg, lora)
    if final is None:  # not the main process
        return {}
    record = _record(model, cfg, teacher_src, data_desc, pairs, counts, hyper, trainer, run)
    _write_output(out, force, inputs, key, final, loaded.tokenizer, model, record)
    if not cfg.keep_checkpoints:
        shutil.rmtree(work, ignore_errors=True)
    if math.isnan(record["train_loss"] or 0.0):
        log.warning("the training loss is NaN; check the learning rate and the data")
    return record


# ---------------------------------------------------------------------------------------------
# retrain()'s steps, in the order it calls them


def _merged_config(config: RetrainConfig | None, options: dict, **named) -> RetrainConfig:
    """The config with keyword options and the named arguments (method, data, teacher) applied, validated."""
    cfg = dataclasses.replace(config or RetrainConfig(), **options)
    for k, v in named.items():
        if v is not None:
            setattr(cfg, k, v)
    cfg.validate()
    return cfg


def _settings(model, cfg: RetrainConfig) -> dict:
    """What the output depends on: the model's name and every option but how the run is driven."""
    run_only = ("resume", "keep_checkpoints")
    return {"model": str(model), **{k: v for k, v in cfg.to_dict().items() if k not in run_only}}


def _check_resume(model, work: Path, cfg: RetrainConfig, inputs: dict, force: bool) -> bool:
    """Whether the run resumes from the checkpoints in `work`; stale checkpoints go only with --force."""
    check_no_overlap(work, inputs)
    check_length(load_config(model, cfg.load.trust_remote_code), cfg.seq_len, "--seq-len")
    have_ckpt = work.is_dir() and any(work.glob("checkpoint-*"))
    if have_ckpt and not cfg.resume:
        if not force:
            raise UsageError(f"{work} holds checkpoints of an interrupted run; pass --resume to continue or --force")
        shutil.rmtree(work, ignore_errors=True)  # every rank may try; all do before the process group starts
    if cfg.resume and not have_ckpt:
        log.warning("--resume: no checkpoint in %s, starting from the beginning", work)
    return bool(cfg.resume and have_ckpt)


def _partial_pairs_and_teacher(model, out: Path, cfg: RetrainConfig):
    """(pairs, teacher): partial's (pruned, original) block pairs, and the teacher model's source (or None)."""
    pairs = None
    if cfg.method == "partial":
        pairs = neighbour_blocks(pruning_record(model))
        if cfg.partial_mse < 0:
            raise UsageError(f"--partial-mse must not be negative, got {cfg.partial_mse}")
    needs_teacher = cfg.method == "distill" or (cfg.method == "partial" and cfg.partial_mse > 0)
    teacher_src = _find_teacher(model, cfg) if needs_teacher else None
    check_no_overlap(out, {"teacher": teacher_src})
    return pairs, teacher_src


def _check_same_options(work: Path, cfg: RetrainConfig) -> None:
    """A resumed run continues the interrupted one only with the same options."""
    saved = work / "retrain_config.json"
    if saved.is_file():
        before = json.loads(saved.read_text())
        now = _plain(cfg.to_dict())
        diff = [k for k in now if k not in ("resume", "keep_checkpoints") and before.get(k) != now[k]]
        if diff:
            raise UsageError(f"--resume with different options than the interrupted run ({', '.join(diff)})")


def _plain(d: dict) -> dict:
    return json.loads(json.dumps(d, default=str))


def _examples(cfg: RetrainConfig, tok) -> tuple[list, list, dict]:
    """(training examples, validation examples, data record): a held-out part of `data` unless val_data is given."""
    if cfg.add_bos and tok.bos_token_id is None:
        raise UsageError("--add-bos was given but the tokenizer has no BOS token")
    examples, data_desc = build_examples(
        cfg.data, tok, cfg.seq_len, cfg.data_format, cfg.text_field, cfg.split, cfg.add_bos, cfg.train_on_prompt
    )
    if cfg.val_data:
        train_ex = examples
        val_ex, val_desc = build_examples(
            cfg.val_data, tok, cfg.seq_len, data_desc["format"], cfg.text_field, "validation", cfg.add_bos,
            cfg.train_on_prompt,
        )  # fmt: skip
    else:
        train_ex, val_ex = split_heldout(examples, cfg.val_fraction, cfg.seed)
        val_desc = {"held_out_of": cfg.data, "fraction": cfg.val_fraction}
    if cfg.max_examples is not None:
        train_ex = train_ex[: cfg.max_examples]
    if cfg.max_val_examples is not None:
        val_ex = val_ex[: cfg.max_val_examples]
    data_desc.update(train_examples=len(train_ex), val_examples=len(val_ex), validation=val_desc)
    return train_ex, val_ex, data_desc


def _wrap_model(net, cfg: RetrainConfig, pairs):
    """(model to train, LoRA config or None, (trainable, total) parameters): LoRA adapters, or partial's frozen
    blocks, or every weight."""
    net.train()
    if cfg.gradient_checkpointing:
        net.config.use_cache = False
    lora = None
    if cfg.weights == "lora":
        peft = _import_peft()
        from transformers import set_seed

        set_seed(cfg.seed)  # LoRA's A matrices are random: the same on every rank and in a one-process run
        lora = peft.LoraConfig(
            r=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=cfg.lora_targets,
            task_type="CAUSAL_LM",
        )
        net = peft.get_peft_model(net, lora)
    if pairs is not None:
        freeze_for_partial(net, [p for p, _ in pairs], cfg.partial_head)
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    total = sum(p.numel() for p in net.parameters())
    log.info("training %d of %d parameters (%s)", trainable, total, cfg.method)
    return net, lora, (trainable, total)


def _import_peft():
    try:
        import peft
    except ImportError as e:
        raise UsageError("LoRA retraining needs peft: pip install 'shortened[retrain]' (or pip install peft)") from e
    return peft


def _trainer(net, tok, cfg: RetrainConfig, work: Path, train_ex, val_ex, pairs, teacher_src, callbacks, progress):
    """(trainer, (lr, weight_decay, bf16)): the Trainer of the method (distill and partial's MSE against a
    teacher); the run's options saved in `work` for a later --resume."""
    from transformers import Trainer

    args, lr, wd, bf16 = _training_args(cfg, work, has_val=bool(val_ex))
    work.mkdir(parents=True, exist_ok=True)
    args.disable_tqdm = not progress
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    common = dict(
        model=net,
        args=args,
        train_dataset=ExampleDataset(train_ex),
        eval_dataset=ExampleDataset(val_ex),
        data_collator=Collator(pad),
        processing_class=tok,
        callbacks=[
            _final_step_callback(),
            *([_time_budget_callback(cfg.max_minutes)] if cfg.max_minutes else []),
            *callbacks,
        ],
    )
    if cfg.method == "distill":
        teacher_model = load_model(teacher_src, cfg.load, tokenizer=False).model
        if teacher_model.config.vocab_size != net.config.vocab_size:
            raise UsageError(f"the teacher {teacher_src} has another vocabulary than the student; use the original")
        trainer = _distill_trainer_class()(
            **common, teacher=teacher_model, temperature=cfg.temperature, kd_weight=cfg.kd_weight,
            ce_weight=cfg.ce_weight,
        )  # fmt: skip
    elif cfg.method == "partial" and cfg.partial_mse > 0:
        teacher_model = load_model(teacher_src, cfg.load, tokenizer=False).model
        trainer = partial_trainer_class()(**common, teacher=teacher_model, pairs=pairs,
                                          mse_weight=cfg.partial_mse)  # fmt: skip
    else:
        trainer = Trainer(**common)
    if cfg.extra_args.get("fsdp") and not trainer.is_fsdp_enabled:  # accelerate 1.15 on CPU: plain DDP, silently
        log.warning("fsdp=%r given, but accelerate runs %s here (FSDP needs GPUs): the weights are not sharded",
                    cfg.extra_args["fsdp"], trainer.accelerator.distributed_type)  # fmt: skip
    if trainer.is_world_process_zero():
        write_json(work / "retrain_config.json", _plain(cfg.to_dict()))
    return trainer, (lr, wd, bf16)


def _train(trainer, work: Path, resuming: bool, has_val: bool) -> dict:
    """Train (from the last checkpoint when resuming); what the record needs of the run."""
    resumed_from = None
    trainer.args.eval_on_start = has_val and not resuming
    trainer.add_callback(_initial_val_callback(work / "initial_val_loss.json"))
    if resuming:
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(str(work))
        resumed_from = int(Path(last).name.split("-")[-1]) if last else None
        log.info("resuming from %s", last)
    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=resuming)
    seconds = time.time() - t0
    prev = work / "initial_val_loss.json"
    best_ckpt = trainer.state.best_model_checkpoint
    return {
        "train_loss": result.training_loss,
        "seconds": seconds,
        "resumed_from": resumed_from,
        "initial_val": json.loads(prev.read_text())["loss"] if prev.is_file() else None,
        "best_step": int(Path(best_ckpt).name.split("-")[-1]) if best_ckpt else trainer.state.global_step,
    }


def _gathered_model(trainer, config, cfg: RetrainConfig, lora):
    """The trained model on the CPU, LoRA merged, gathered from the ranks where FSDP / DeepSpeed shard it;
    None on every process but the main one."""
    from transformers import AutoModelForCausalLM

    final = trainer.accelerator.unwrap_model(trainer.model)
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # the DeepSpeed engine / FSDP module
        if trainer.is_world_process_zero():
            if trainer.is_deepspeed_enabled:  # else from_config builds a ZeRO-3-partitioned (empty) model
                from transformers.integrations.deepspeed import unset_hf_deepspeed_config

                unset_hf_deepspeed_config()
            final = AutoModelForCausalLM.from_config(config)
            if cfg.weights == "lora":
                final = _import_peft().get_peft_model(final, lora)
            final.load_state_dict(state_dict)
    if not trainer.is_world_process_zero():
        return None
    if cfg.weights == "lora":
        final = final.merge_and_unload()
    final = final.to("cpu").eval()
    final.config.use_cache = True
    return final


def _record(model, cfg: RetrainConfig, teacher_src, data_desc, pairs, counts, hyper, trainer, run) -> dict:
    """retraining.json: what was trained on what, how, and the losses."""
    trainable, total = counts
    state = trainer.state
    return {
        "method": cfg.method,
        "weights": cfg.weights,
        "source_model": str(model),
        "teacher": teacher_src,
        "data": data_desc,
        "steps": state.global_step,
        "epochs": round(float(state.epoch or 0), 4),
        "best_step": run["best_step"],
        "resumed_from_step": run["resumed_from"],
        "trainable_parameters": trainable,
        "trained_blocks": pairs and [{"pruned": p, "original": o} for p, o in pairs],
        "total_parameters": total,
        "hyperparameters": _hyperparameters(cfg, *hyper, world_size=trainer.args.world_size),
        "losses": {"initial_val": run["initial_val"], **_losses(state.log_history)},
        "best_val_loss": state.best_metric,
        "train_loss": run["train_loss"],
        "seconds": round(run["seconds"], 2),
        "config": _plain(cfg.to_dict()),
    }


def _hyperparameters(cfg: RetrainConfig, lr, wd, bf16, world_size) -> dict:
    hp = {
        "lr": lr,
        "weight_decay": wd,
        "batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum,
        "world_size": world_size,
        "seq_len": cfg.seq_len,
        "scheduler": cfg.scheduler,
        "warmup_ratio": cfg.warmup_ratio,
        "bf16": bf16,
        "gradient_checkpointing": cfg.gradient_checkpointing,
    }
    if cfg.weights == "lora":
        hp.update(lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                  lora_targets=cfg.lora_targets)  # fmt: skip
    if cfg.method == "distill":
        hp.update(temperature=cfg.temperature, kd_weight=cfg.kd_weight, ce_weight=cfg.ce_weight)
    if cfg.method == "partial":
        hp.update(partial_head=cfg.partial_head, partial_mse=cfg.partial_mse)
    return hp


def _write_output(out: Path, force: bool, inputs: dict, key: str, final, tok, model, record: dict) -> None:
    """The standard checkpoint, the pruned model's records (how it was made) and retraining.json, all at once."""
    with atomic_dir(out, force, inputs, key=key, result=record) as tmp:
        save_checkpoint(final, tok, tmp)
        for extra in ("pruning.json", "scores.json", "scores.png"):  # keep how the pruned model was made
            if (Path(model) / extra).is_file():
                shutil.copy2(Path(model) / extra, tmp / extra)
        write_json(tmp / "retraining.json", record)
