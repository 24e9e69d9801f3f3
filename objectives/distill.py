"""Knowledge distillation from any teacher workdir: DistilBERT, and MobileBERT-style
layer-wise transfer (docs/distill.md).

The teacher is our Encoder + MLM head with the teacher run's EncoderConfig, loaded from a
workdir (one of our runs, or a Hugging Face checkpoint imported by launch/import_hf.py).
It lives in params["distill"]["teacher"] = {"encoder", "mlm": {"head"}} (checkpointed with
the run, sharded by the same logical rules), is listed in `frozen_paths` (no optimizer
update, no optimizer state), runs without dropout inside the same jitted step, and its
outputs are under stop_gradient. The student is the run's own encoder and MLM head,
params["encoder"] and params["mlm"]["head"], laid out as for plain MLM, so fine-tuning,
export and continued MLM pretraining read it like any other run.

Masking is `config.mlm`'s (the distill objective wraps MaskedLM). Loss, DistilBERT mode:

  alpha_ce * T^2 * KL(softmax(t/T) || softmax(s/T))   over every non-pad token
                                                        (kl_positions="masked": the masked)
  + alpha_mlm * MLM                                     (the student's masked-LM loss)
  + alpha_cos * (1 - cos(h_s, h_t))                     last hidden states, non-pad tokens

Layer-wise mode (MobileBERT's feature-map and attention transfer) adds, for a student of
the teacher's depth, per layer l: alpha_hidden * MSE(P h_s^l, h_t^l) + alpha_attention *
KL(A_t^l || A_s^l) (attention distributions per head and query), P a learned projection
when the widths differ, weighted per layer by the schedule (progressive: layer l alone in
stage l with the layers below cut off from its gradient; all_at_once: every layer; both
followed by pretraining distillation, the DistilBERT-mode loss; auxiliary: everything from
the first step). The schedule reads the training step from batch["step"].

Masking with DistilBERT's frequency smoothing (mlm_smoothing 0.7: p ~ count^-0.7) is
`config.mlm.smoothing`, which the distilbert preset sets; departure (docs/objectives.md):
each sequence draws its own budget, DistilBERT draws over the whole batch.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import objectives
from bert_jax import heads
from bert_jax.encoder import DTYPES, Encoder, EncoderConfig
from objectives.base import Objective, SpecialIds
from objectives.mlm import (MaskedLM, MLMHeadOnPositions, gather_logits, mask_padded_vocab,
                            masked_lm_loss)

MODES = ("distilbert", "layerwise")
KL_POSITIONS = ("all", "masked")
SCHEDULES = ("progressive", "all_at_once", "auxiliary")
TEACHER = ("distill", "teacher")  # where the teacher's parameters live


# ----------------------------------------------------------------------------- losses


def soft_kl(student_logits, teacher_logits, weights, temperature: float):
  """T^2 * KL(softmax(t/T) || softmax(s/T)) per position, as (weighted sum, sum of weights).

  sum / count is torch's kl_div(log_softmax(s/T), softmax(t/T), "batchmean") * T^2 over
  the positions with weight 1 (DistilBERT's loss_ce).
  """
  t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  p = jnp.exp(t)
  kl = jnp.sum(jnp.where(p > 0, p * (t - s), 0.0), axis=-1) * temperature ** 2
  w = weights.astype(jnp.float32)
  return jnp.sum(kl * w), jnp.sum(w)


def cosine_loss(student_BxLxH, teacher_BxLxH, mask_BxL):
  """1 - cos per token over non-pad tokens, as (sum, count); torch's cosine_embedding_loss
  with target 1 (same 1e-12 on the squared norms) is sum / count."""
  s = student_BxLxH.astype(jnp.float32)
  t = teacher_BxLxH.astype(jnp.float32)
  cos = jnp.sum(s * t, -1) / jnp.sqrt((jnp.sum(s * s, -1) + 1e-12) * (jnp.sum(t * t, -1) + 1e-12))
  w = (mask_BxL > 0).astype(jnp.float32)
  return jnp.sum((1.0 - cos) * w), jnp.sum(w)


def hidden_mse(student_BxLxH, teacher_BxLxH, mask_BxL):
  """Mean squared error per token (mean over the width), as (sum over non-pad, count)."""
  d = student_BxLxH.astype(jnp.float32) - teacher_BxLxH.astype(jnp.float32)
  w = (mask_BxL > 0).astype(jnp.float32)
  return jnp.sum(jnp.mean(d * d, -1) * w), jnp.sum(w)


def attention_kl(student_BxHxLxL, teacher_BxHxLxL, mask_BxL):
  """KL(teacher || student) of each head's attention distribution at each non-pad query,
  as (sum, count = heads x non-pad queries). Padded keys have probability 0 in both."""
  tiny = jnp.finfo(jnp.float32).tiny
  t = teacher_BxHxLxL.astype(jnp.float32)
  s = student_BxHxLxL.astype(jnp.float32)
  kl = jnp.sum(t * (jnp.log(jnp.maximum(t, tiny)) - jnp.log(jnp.maximum(s, tiny))), -1)
  w = (mask_BxL > 0).astype(jnp.float32)[:, None, :]
  return jnp.sum(kl * w), jnp.sum(w) * t.shape[1]


def transfer_schedule(step, num_layers: int, schedule: str, stage_steps: int):
  """Jittable per-step weights of the layer-wise stage.

  Returns (layer_weights [L], pd_weight, stage, cut): layer l's transfer-loss weight; the
  weight of the pretraining-distillation loss (KL + MLM + cos); the stage index (0..L-1
  layer stages then L for progressive, 0 then 1 for all_at_once, 0 for auxiliary); the
  layer whose input is cut from the gradient (-1: none). `step` None (evaluation): every
  layer at 1/L and the pretraining-distillation loss, no cut.
  """
  L = num_layers
  if schedule == "auxiliary" or step is None:
    return (jnp.full((L,), 1.0 / L), jnp.ones((), jnp.float32), jnp.zeros((), jnp.int32),
            jnp.full((), -1, jnp.int32))
  step = jnp.asarray(step, jnp.int32)
  if schedule == "progressive":
    stage = jnp.minimum(step // stage_steps, L)
    weights = (jnp.arange(L) == stage).astype(jnp.float32)
    transfer = stage < L
    cut = jnp.where(transfer, stage, -1)
  else:  # all_at_once, for as many steps as the progressive stages take together
    transfer = step < L * stage_steps
    stage = jnp.where(transfer, 0, 1)
    weights = jnp.where(transfer, 1.0 / L, 0.0) * jnp.ones((L,), jnp.float32)
    cut = jnp.full((), -1, jnp.int32)
  return weights, jnp.where(transfer, 0.0, 1.0), stage.astype(jnp.int32), cut.astype(jnp.int32)


# ----------------------------------------------------------------------------- modules


class Teacher(nn.Module):
  """The frozen teacher: Encoder + MLM head (at the masked positions, or at every one),
  no dropout."""

  cfg: EncoderConfig
  all_positions: bool = False  # logits at every position [B, L, V], else at the masked

  @nn.compact
  def __call__(self, batch, *, layerwise: bool):
    encoder = Encoder(self.cfg, name="encoder")
    out = encoder(batch["input_ids"], batch.get("segment_ids"), batch["attention_mask"],
                  deterministic=True, output_hidden_states=layerwise,
                  output_attentions=layerwise)
    out = dict(out, logits=MLMHeadOnPositions(self.cfg, gather=not self.all_positions,
                                              name="mlm")(out, batch, encoder,
                                                          deterministic=True))
    return jax.lax.stop_gradient(out)


class DistillModule(nn.Module):
  """params["distill"]: the teacher, and the student->teacher width projection if needed."""

  teacher_cfg: EncoderConfig
  student_cfg: EncoderConfig
  layerwise: bool
  project: bool  # a learned projection of the student's hidden states to the teacher's width
  all_positions: bool = False  # the teacher's logits at every position (KL on all tokens)

  @nn.compact
  def __call__(self, batch, student):
    teacher = Teacher(self.teacher_cfg, self.all_positions, name="teacher")(
        batch, layerwise=self.layerwise)
    proj = lambda h: h  # noqa: E731
    if self.project:
      cfg = self.student_cfg
      proj = nn.Dense(self.teacher_cfg.hidden_size, dtype=DTYPES[cfg.dtype],
                      param_dtype=DTYPES[cfg.param_dtype],
                      kernel_init=nn.with_logical_partitioning(
                          nn.initializers.truncated_normal(cfg.initializer_range),
                          ("embed", None)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                             (None,)),
                      name="projection")
    out = {"teacher_logits": teacher["logits"], "teacher_hidden": teacher["hidden_states"],
           "student_hidden": proj(student["hidden_states"])}
    if self.layerwise:
      out["teacher_layers"] = teacher["all_hidden_states"][1:]
      out["teacher_attentions"] = teacher["attentions"]
      out["student_layers"] = tuple(proj(h) for h in student["all_hidden_states"][1:])
      out["student_attentions"] = student["attentions"]
    return out


def student_pass(encoder: Encoder, batch, *, deterministic: bool, cut) -> dict[str, Any]:
  """The student's forward pass with every layer's states and attention maps, the input of
  layer `cut` (a traced int; -1: none) under stop_gradient: progressive transfer trains
  one layer while the embeddings and the layers below get no gradient."""
  return encoder(batch["input_ids"], batch.get("segment_ids"), batch["attention_mask"],
                 deterministic=deterministic, output_hidden_states=True,
                 output_attentions=True, stop_gradient_layer=cut)


# ----------------------------------------------------------------------------- init


def teacher_config(workdir: str, student: EncoderConfig) -> EncoderConfig:
  """The teacher run's EncoderConfig (its config.json), computing in the student's dtype."""
  from bert_jax import run_config
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"distill.teacher={workdir!r} is not a run's workdir (no "
                            "config.json); give a pretraining run or an import from "
                            "launch/import_hf.py")
  cfg = EncoderConfig.from_dict(run_config.load(workdir).model)
  return dataclasses.replace(cfg, dtype=student.dtype, remat="none",
                             attention_impl=student.attention_impl)


def teacher_tokenizer(workdir: str) -> str:
  """The tokenizer a teacher run used: its config's data.tokenizer or its workdir copy."""
  from bert_jax import run_config
  from bert_jax.data import tokenizer as tokenizer_lib
  configured = ""
  if os.path.isfile(os.path.join(workdir, run_config.CONFIG_FILE)):  # it may not have run yet
    configured = run_config.load(workdir).get("data", {}).get("tokenizer", "")
  return configured or os.path.join(os.path.abspath(workdir), tokenizer_lib.MODEL_FILENAME)


def default_layers(teacher_layers: int, student_layers: int) -> tuple[int, ...]:
  """Evenly spaced teacher layers, every second one for half the depth (0, 2, 4, ...)."""
  return tuple(j * teacher_layers // student_layers for j in range(student_layers))


def parse_layers(spec: Any, teacher_layers: int, student_layers: int) -> tuple[int, ...]:
  """distill.student_layers ("0,2,4,7,9,11", a tuple, or empty for the default)."""
  if isinstance(spec, str):
    spec = [s for s in spec.replace(" ", "").split(",") if s]
  layers = tuple(int(s) for s in (spec or ()))
  if not layers:
    return default_layers(teacher_layers, student_layers)
  if len(layers) != student_layers:
    raise ValueError(f"distill.student_layers={layers} names {len(layers)} teacher layers "
                     f"for a student of {student_layers} layers (model.num_layers)")
  bad = [i for i in layers if not 0 <= i < teacher_layers]
  if bad:
    raise ValueError(f"distill.student_layers: {bad} out of range for a teacher of "
                     f"{teacher_layers} layers (0..{teacher_layers - 1})")
  return layers


def check_same_width(student: EncoderConfig, teacher: EncoderConfig) -> None:
  """Initialising the student from the teacher copies tensors: the widths must agree."""
  if student.hidden_size != teacher.hidden_size:
    raise ValueError(
        f"distill: the student's hidden_size {student.hidden_size} differs from the "
        f"teacher's {teacher.hidden_size}; initialising the student from the teacher copies "
        f"its layers and needs equal widths: set --config.model.hidden_size="
        f"{teacher.hidden_size}, or --config.distill.init_student=False")
  fields = ("intermediate_size", "num_heads", "embed_size", "vocab_size",
            "max_position_embeddings", "position_offset", "position_embedding",
            "pre_layer_norm", "hidden_act")
  wrong = [f"{f}: student {getattr(student, f, None)} vs teacher {getattr(teacher, f, None)}"
           for f in fields if getattr(student, f, None) != getattr(teacher, f, None)]
  if student.num_layer_groups is not None:
    wrong.append(f"num_layer_groups: student {student.num_layer_groups} (a student "
                 "initialised from teacher layers cannot share layers)")
  if wrong:
    raise ValueError("distill: cannot initialise the student from the teacher, the shapes "
                     "differ (" + "; ".join(wrong) + "); match model.* to the teacher or set "
                     "--config.distill.init_student=False")


def _conform(src, like, path: str):
  """`src` with `like`'s tree structure, shapes and dtypes (host numpy), or a clear error."""
  if isinstance(like, dict):
    if not isinstance(src, dict) or set(src) != set(like):
      have = sorted(src) if isinstance(src, dict) else type(src).__name__
      raise ValueError(f"{path}: the teacher has {have}, the model expects {sorted(like)}")
    return {k: _conform(src[k], like[k], f"{path}/{k}") for k in like}
  src = np.asarray(src)
  if src.shape != tuple(like.shape):
    raise ValueError(f"{path}: the teacher's tensor has shape {src.shape}, the model "
                     f"expects {tuple(like.shape)}")
  return src.astype(like.dtype)


def student_from_teacher(student_encoder, student_mlm, teacher_encoder, teacher_mlm,
                         layers: tuple[int, ...], teacher_cfg: EncoderConfig):
  """(encoder, mlm) params of the student with the teacher's embeddings, its layers
  `layers` (student layer j <- teacher layer layers[j]), final norm and MLM head.

  A student without token types gets the teacher's type-0 vector folded into its position
  embeddings (exact for single-segment inputs: DistilBERT dropped token types); a student
  with token types from a teacher without gets zeros (exact).
  """
  per_group = teacher_cfg.num_layers // (teacher_cfg.num_layer_groups or teacher_cfg.num_layers)
  emb_t = dict(teacher_encoder["embeddings"])
  emb_s = student_encoder["embeddings"]
  types_t = emb_t.pop("token_type_embeddings", None)
  if types_t is not None and "token_type_embeddings" not in emb_s:
    if "position_embeddings" not in emb_t:
      raise ValueError("distill: a student without token types folds the teacher's type-0 "
                       "vector into its position table, and this teacher has none; give "
                       "the student the teacher's model.type_vocab_size")
    pos = dict(emb_t["position_embeddings"])
    pos["embedding"] = (np.asarray(pos["embedding"])
                        + np.asarray(types_t["embedding"])[0][None, :])
    emb_t["position_embeddings"] = pos
  if "token_type_embeddings" in emb_s:
    emb_t["token_type_embeddings"] = (
        types_t if types_t is not None else jax.tree.map(np.zeros_like,
                                                         emb_s["token_type_embeddings"]))
  encoder = {"embeddings": _conform(emb_t, emb_s, "encoder/embeddings")}
  for j, i in enumerate(layers):
    src = teacher_encoder[f"layer_{i // per_group}"]
    encoder[f"layer_{j}"] = _conform(src, student_encoder[f"layer_{j}"], f"encoder/layer_{j}")
  if "final_norm" in student_encoder:
    encoder["final_norm"] = _conform(teacher_encoder["final_norm"],
                                     student_encoder["final_norm"], "encoder/final_norm")
  missing = sorted(set(student_encoder) - set(encoder))
  if missing:
    raise ValueError(f"distill: no teacher weights for the student's {missing}")
  mlm = dict(student_mlm, head=_conform(teacher_mlm["head"], student_mlm["head"], "mlm/head"))
  return encoder, mlm


# ----------------------------------------------------------------------------- objective


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """config.distill: DistilBERT's recipe (5 * KL at T=2 + 2 * MLM + 1 * cosine); mode
  "layerwise" adds MobileBERT's per-layer feature-map MSE and attention KL, scheduled
  progressive | all_at_once | auxiliary over stage_steps per layer. student_layers: the
  teacher layers copied into the student ("0,2,4,7,9,11"; "": every second)."""

  teacher: str = ""  # the teacher's workdir (ours, or imported by launch/import_hf.py)
  teacher_step: int = -1  # -1: its latest checkpoint
  mode: str = "distilbert"
  temperature: float = 2.0
  alpha_ce: float = 5.0
  alpha_mlm: float = 2.0
  alpha_cos: float = 1.0
  alpha_hidden: float = 1.0
  alpha_attention: float = 1.0
  schedule: str = "progressive"
  stage_steps: int = 1  # presets: max(1, train.steps // 20)
  init_student: bool = True
  student_layers: str = ""
  # Where the soft-target KL is taken: "all" non-pad tokens (DistilBERT's default,
  # restrict_ce_to_mask off) or the "masked" positions only (restrict_ce_to_mask on).
  kl_positions: str = "all"

  def __post_init__(self):
    if self.kl_positions not in KL_POSITIONS:
      raise ValueError(f"distill.kl_positions: {self.kl_positions!r} is not one of "
                       f"{KL_POSITIONS}")
    if self.mode not in MODES:
      raise ValueError(f"distill.mode: {self.mode!r} is not one of {MODES}")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"distill.schedule: {self.schedule!r} is not one of {SCHEDULES}")
    if self.temperature <= 0:
      raise ValueError(f"distill.temperature must be positive, got {self.temperature}")


@objectives.register
@dataclasses.dataclass(frozen=True)
class Distill(Objective):
  name = "distill"
  Config = DistillConfig

  mlm: MaskedLM  # masking and the student's MLM loss
  teacher: str  # the teacher's workdir
  teacher_cfg: EncoderConfig
  student_cfg: EncoderConfig
  teacher_step: int | None = None  # None: the latest checkpoint
  mode: str = "distilbert"
  temperature: float = 2.0
  alpha_ce: float = 5.0
  alpha_mlm: float = 2.0
  alpha_cos: float = 1.0
  alpha_hidden: float = 1.0
  alpha_attention: float = 1.0
  schedule: str = "progressive"
  stage_steps: int = 1
  init_student: bool = True
  student_layers: tuple[int, ...] = ()
  kl_positions: str = "all"

  @property
  def layerwise(self) -> bool:
    return self.mode == "layerwise"

  @property
  def runs_encoder(self) -> bool:  # layer-wise runs the student itself (with a gradient cut)
    return self.layerwise

  @property
  def project(self) -> bool:
    return self.student_cfg.hidden_size != self.teacher_cfg.hidden_size

  def view(self):
    return self.mlm.masked  # the student and the teacher read config.mlm's masked input

  def param_groups(self):
    return (self.name, "mlm")  # the student's MLM head sits where plain MLM's does

  @classmethod
  def complete_config(cls, config):
    """The student reads its teacher's tokenizer: data.tokenizer defaults to it."""
    teacher = config[cls.name].teacher
    if teacher and not config.data.get("tokenizer"):
      config.data.tokenizer = teacher_tokenizer(teacher)

  @classmethod
  def from_config(cls, config, special: SpecialIds):
    c = cls.section(config)
    if not c.teacher:
      raise ValueError("distill.teacher: give the teacher's workdir (one of our runs, or a "
                       "Hugging Face checkpoint imported by launch/import_hf.py), e.g. "
                       "--config.distill.teacher=runs/bert_base")
    student = EncoderConfig.from_dict(config.model)
    teacher = teacher_config(c.teacher, student)
    if not config.data.get("tokenizer"):
      raise ValueError("distill: the student reads the teacher's tokenizer; give it with "
                       f"--config.data.tokenizer={teacher_tokenizer(c.teacher)}")
    if teacher.vocab_size != student.vocab_size:
      raise ValueError(f"distill: the teacher's vocabulary ({teacher.vocab_size}) differs "
                       f"from the student's model.vocab_size ({student.vocab_size}); the "
                       "student must use the teacher's tokenizer and vocab_size")
    if config.data.seq_len > teacher.max_position_embeddings:
      raise ValueError(f"data.seq_len={config.data.seq_len} exceeds the teacher's "
                       f"max_position_embeddings={teacher.max_position_embeddings}")
    layers: tuple[int, ...] = ()
    if c.init_student:
      check_same_width(student, teacher)
      layers = parse_layers(c.student_layers, teacher.num_layers, student.num_layers)
    if c.mode == "layerwise":
      if student.num_layers != teacher.num_layers:
        raise ValueError(f"distill.mode=layerwise transfers layer by layer: the student's "
                         f"num_layers {student.num_layers} must equal the teacher's "
                         f"{teacher.num_layers}")
      if c.alpha_attention > 0 and student.num_heads != teacher.num_heads:
        raise ValueError(f"distill: attention transfer compares heads one to one: the "
                         f"student's num_heads {student.num_heads} must equal the "
                         f"teacher's {teacher.num_heads} (or set distill.alpha_attention=0)")
      if c.schedule != "auxiliary" and c.stage_steps < 1:
        raise ValueError(f"distill.stage_steps must be >= 1 for schedule {c.schedule!r}, "
                         f"got {c.stage_steps}")
    return cls(
        mlm=MaskedLM.from_config(config, special), teacher=os.path.abspath(c.teacher),
        teacher_cfg=teacher, student_cfg=student,
        teacher_step=None if c.teacher_step < 0 else int(c.teacher_step), mode=c.mode,
        temperature=float(c.temperature), alpha_ce=float(c.alpha_ce),
        alpha_mlm=float(c.alpha_mlm), alpha_cos=float(c.alpha_cos),
        alpha_hidden=float(c.alpha_hidden), alpha_attention=float(c.alpha_attention),
        schedule=c.schedule, stage_steps=max(int(c.stage_steps), 1),
        init_student=bool(c.init_student), student_layers=layers,
        kl_positions=c.kl_positions)

  def frozen_paths(self):
    return (TEACHER,)

  def head(self, encoder_config, name):
    """Not one module but two siblings under the model: the student's MLM head as
    params["mlm"] (MaskedLM's layout) and DistillModule as params[name]."""
    obj = self

    def run(encoded, batch, encoder, *, deterministic: bool):
      step = batch["step"][0] if "step" in batch else None
      if obj.layerwise and step is None and not deterministic and obj.schedule != "auxiliary":
        raise ValueError(f"distill.schedule={obj.schedule!r} needs the training step in "
                         "the batch (batch['step'], set by bert_jax.train.train_step)")
      schedule = transfer_schedule(step, encoder_config.num_layers, obj.schedule,
                                   obj.stage_steps) if obj.layerwise else None
      student = encoded
      if obj.layerwise:
        student = student_pass(encoder, batch, deterministic=deterministic, cut=schedule[3])
      every = obj.kl_positions == "all"
      logits = MLMHeadOnPositions(encoder_config, predict_all=obj.mlm.predict_all,
                                  gather=not every, name="mlm")(
          student, batch, encoder, deterministic=deterministic)
      out = DistillModule(obj.teacher_cfg, encoder_config, obj.layerwise, obj.project,
                          every, name=name)(batch, student)
      out["student_logits"] = logits
      if schedule is not None:
        out["layer_weights"], out["pd_weight"], out["stage"], _ = schedule
      return out

    return run

  def loss(self, outputs, batch):
    # Rows of a vocabulary padded past the tokenizer's are out of both softmaxes.
    vocab = self.mlm.special.vocab_size
    student_logits = mask_padded_vocab(outputs["student_logits"], vocab)
    # KL at every non-pad token ([B, L, V] logits) or at the masked positions ([B, P, V]).
    every = self.kl_positions == "all"
    kl_weights = batch["attention_mask"] if every else batch["mlm_weights"]
    kl_sum, kl_n = soft_kl(student_logits, mask_padded_vocab(outputs["teacher_logits"], vocab),
                           kl_weights, self.temperature)
    if every:
      student_logits = gather_logits(student_logits, batch)
    mlm_loss, mlm_metrics = masked_lm_loss(student_logits, batch["mlm_ids"],
                                           batch["mlm_weights"])
    cos_sum, cos_n = cosine_loss(outputs["student_hidden"], outputs["teacher_hidden"],
                                 batch["attention_mask"])
    kl, cos = kl_sum / (kl_n + 1e-5), cos_sum / (cos_n + 1e-6)
    total = self.alpha_ce * kl + self.alpha_mlm * mlm_loss + self.alpha_cos * cos
    metrics = {"kl_loss": heads.metric(kl_sum, kl_n), "mlm_loss": mlm_metrics["loss"],
               "accuracy": mlm_metrics["accuracy"], "cos_loss": heads.metric(cos_sum, cos_n)}
    if not self.layerwise:
      return total, metrics
    mask = batch["attention_mask"]
    per_layer, hid, att = [], [], []
    for s, t, sa, ta in zip(outputs["student_layers"], outputs["teacher_layers"],
                            outputs["student_attentions"], outputs["teacher_attentions"]):
      h_sum, h_n = hidden_mse(s, t, mask)
      a_sum, a_n = attention_kl(sa, ta, mask)
      hid.append((h_sum, h_n))
      att.append((a_sum, a_n))
      per_layer.append(self.alpha_hidden * h_sum / (h_n + 1e-6)
                       + self.alpha_attention * a_sum / (a_n + 1e-6))
    transfer = jnp.sum(outputs["layer_weights"] * jnp.stack(per_layer))
    total = transfer + outputs["pd_weight"] * total
    n_layers = len(hid)
    one = jnp.ones((), jnp.float32)
    # The per-layer terms averaged over all layers, whatever the schedule weights.
    metrics["hidden_loss"] = heads.metric(sum(s for s, _ in hid) / n_layers, hid[0][1])
    metrics["attention_loss"] = heads.metric(sum(s for s, _ in att) / n_layers, att[0][1])
    metrics["transfer_loss"] = heads.metric(transfer, one)
    metrics["stage"] = heads.metric(outputs["stage"], one)
    return total, metrics

  def initialize(self, params):
    """Loads the teacher into params["distill"]["teacher"]; initialises the student's
    encoder and MLM head from it (distill.init_student)."""
    from bert_jax import checkpoint
    restored, _ = checkpoint.restore_params(self.teacher, self.teacher_step)
    if "mlm" not in restored or "encoder" not in restored:
      raise ValueError(f"distill.teacher={self.teacher!r}: the checkpoint has "
                       f"{sorted(restored)}; distillation needs the teacher's encoder and "
                       "MLM head (params['encoder'], params['mlm'])")
    teacher = _conform({"encoder": restored["encoder"], "mlm": {"head": restored["mlm"]["head"]}},
                       params[TEACHER[0]][TEACHER[1]], "distill/teacher")
    out = dict(params)
    out[TEACHER[0]] = dict(params[TEACHER[0]], **{TEACHER[1]: teacher})
    if self.init_student:
      check_same_width(self.student_cfg, self.teacher_cfg)
      out["encoder"], out["mlm"] = student_from_teacher(
          params["encoder"], params["mlm"], teacher["encoder"], teacher["mlm"],
          self.student_layers, self.teacher_cfg)
    return out
