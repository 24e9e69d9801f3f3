"""Replaced-token detection (ELECTRA): a small MLM generator corrupts, the encoder detects.

The generator is our Encoder at `generator_size` of the discriminator's width (same depth
by default), reading the discriminator's embedding tables and embedding LayerNorm (each
tower projects to its own width when the sizes differ) and decoding through the same tied
word embeddings. Replacements are sampled from its softmax by Gumbel-max under
stop_gradient, so the discriminator loss never reaches the generator through the samples.
The discriminator is the shared "encoder": fine-tuning and export load it like any encoder.

Parameters: params["encoder"] (discriminator + shared tables), params["rtd"]["generator"],
params["rtd"]["generator_head"], params["rtd"]["discriminator_head"].
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

import objectives
from bert_jax import heads
from bert_jax.encoder import Encoder, EncoderConfig
from objectives.base import Objective, SpecialIds, Tower
from objectives.masking import MaskingConfig, mask_batch
from objectives.mlm import mask_padded_vocab, masked_lm_loss


def generator_config(disc: EncoderConfig, size: float, layers: int | None) -> EncoderConfig:
  """ELECTRA's generator: hidden, heads and FFN scaled by `size`, the same embedding width."""
  if not 0 < size <= 1:
    raise ValueError(f"rtd.generator_size must be in (0, 1], got {size}")
  heads_ = max(1, round(disc.num_heads * size))
  hidden = max(heads_, round(disc.hidden_size * size / heads_) * heads_)
  return dataclasses.replace(
      disc, hidden_size=hidden, num_heads=heads_,
      intermediate_size=max(1, round(disc.intermediate_size * size)),
      num_layers=layers or disc.num_layers, embedding_size=disc.embed_size,
      num_layer_groups=None)


# What the generator shares with the discriminator (under params["encoder"]): the embedding
# tables and the embedding LayerNorm. Each tower keeps its own embeddings/projection.
SHARED = ("embeddings/word_embeddings/", "embeddings/position_embeddings/",
          "embeddings/token_type_embeddings/", "embeddings/layer_norm/")
# Fields of an imported generator's EncoderConfig that generator_config must give back from
# the discriminator's (dropout and initializer ranges are the discriminator's).
GENERATOR_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads",
                    "intermediate_size", "embed_size", "max_position_embeddings",
                    "position_offset", "type_vocab_size", "hidden_act", "layer_norm_eps")
# transformers holds the generator as an ElectraForMaskedLM: our encoder + MaskedLM's head.
GENERATOR = Tower("generator", "electra", ("mlm",))


def _flat(tree) -> dict[str, Any]:
  return traverse_util.flatten_dict(tree, sep="/")


def gumbel_sample(key, logits, temperature: float):
  """argmax(logits / T + Gumbel noise): a sample from softmax(logits / T)."""
  u = jax.random.uniform(key, logits.shape, jnp.float32, minval=1e-9, maxval=1.0)
  return jnp.argmax(logits / temperature - jnp.log(-jnp.log(u)), axis=-1).astype(jnp.int32)


class RTDModule(nn.Module):
  disc_cfg: EncoderConfig
  gen_cfg: EncoderConfig
  temperature: float
  vocab_size: int | None = None  # the tokenizer's; the table may be padded past it

  @nn.compact
  def __call__(self, encoded, batch, encoder: Encoder, *, deterministic: bool):
    del encoded
    ids, seg, mask = batch["input_ids"], batch.get("segment_ids"), batch["attention_mask"]
    seg = jnp.zeros_like(ids) if seg is None else seg
    positions = encoder.embeddings.position_ids(mask)
    shared = encoder.embeddings.embed(ids, seg, positions, deterministic=deterministic)
    gen = Encoder(self.gen_cfg, name="generator")(
        ids, seg, mask, inputs_embeds=shared, deterministic=deterministic)
    gen_logits = heads.MLMHead(self.gen_cfg, name="generator_head")(
        heads.gather_positions(gen["hidden_states"], batch["mlm_positions"]), encoder)

    keys = jax.vmap(jax.random.wrap_key_data)(batch["rtd_sample_keys"])
    sampled = jax.vmap(gumbel_sample, in_axes=(0, 0, None))(
        keys, mask_padded_vocab(jax.lax.stop_gradient(gen_logits), self.vocab_size),
        self.temperature)
    original = batch["original_ids"]
    rows = jnp.arange(ids.shape[0])[:, None]
    # Padding slots of mlm_positions point at position 0: send them out of range (dropped)
    # rather than write position 0 twice, which would race a real prediction there.
    positions = jnp.where(batch["mlm_weights"] > 0, batch["mlm_positions"], ids.shape[1])
    disc_ids = original.at[rows, positions].set(sampled, mode="drop")
    # A correct guess by the generator counts as original.
    labels = ((disc_ids != original) & (mask > 0)).astype(jnp.int32)
    hidden = encoder(disc_ids, seg, mask, deterministic=deterministic)["hidden_states"]
    disc_logits = heads.DiscriminatorHead(self.disc_cfg, name="discriminator_head")(hidden)
    return {"generator_logits": gen_logits, "discriminator_logits": disc_logits,
            "labels": labels, "disc_ids": disc_ids}


class DiscriminatorLogits(nn.Module):
  """ElectraForPreTraining's head at every token: params[name]["discriminator_head"]."""

  cfg: EncoderConfig

  @nn.compact
  def __call__(self, hidden, encoder, *, deterministic: bool):
    del encoder, deterministic
    return {"logits": heads.DiscriminatorHead(self.cfg, name="discriminator_head")(hidden)}


def discriminator_loss(logits_BxL, labels_BxL, mask_BxL):
  """Sigmoid CE over non-pad tokens (mean), plus accuracy/precision/recall/AUC as (sum, count)."""
  w = (mask_BxL > 0).astype(jnp.float32)
  y = labels_BxL.astype(jnp.float32)
  ce = jnp.maximum(logits_BxL, 0) - logits_BxL * y + jnp.log1p(jnp.exp(-jnp.abs(logits_BxL)))
  n = jnp.sum(w)
  pred = (logits_BxL > 0).astype(jnp.float32)
  tp = jnp.sum(pred * y * w)
  return jnp.sum(ce * w) / (n + 1e-6), {
      "disc_loss": heads.metric(jnp.sum(ce * w), n),
      "disc_accuracy": heads.metric(jnp.sum((pred == y) * w), n),
      "disc_precision": heads.metric(tp, jnp.sum(pred * w)),
      "disc_recall": heads.metric(tp, jnp.sum(y * w)),
      "replaced_fraction": heads.metric(jnp.sum(y * w), n),
      "disc_auc": detection_auc(logits_BxL, y, w),
  }


def detection_auc(logits_BxL, y_BxL, w_BxL):
  """ROC AUC of the discriminator over the batch's non-pad tokens, as (pairs ranked right,
  pairs): the chance that a replaced token scores above an original one. Unlike recall at
  0.5, it moves while the discriminator still predicts "original" everywhere, which is
  where a small model spends its first thousands of steps.
  """
  flat_w = w_BxL.reshape(-1) > 0
  flat_y = y_BxL.reshape(-1) * flat_w
  # Pads sort first, so a valid token's rank minus the pad count is its rank among valid ones.
  scores = jnp.where(flat_w, logits_BxL.reshape(-1).astype(jnp.float32), -jnp.inf)
  ranks = jnp.argsort(jnp.argsort(scores)).astype(jnp.float32)
  valid_ranks = ranks - jnp.sum(~flat_w)
  positives = jnp.sum(flat_y)
  negatives = jnp.sum(flat_w) - positives
  # Mann-Whitney U: originals ranked below each replaced token, summed.
  u = jnp.sum(valid_ranks * flat_y) - positives * (positives - 1) / 2
  return heads.metric(u, positives * negatives)


@dataclasses.dataclass(frozen=True)
class RTDConfig:
  """config.rtd: ELECTRA's recipe (15% masked, 85% [MASK] / 15% kept, a 1/4 generator,
  loss gen_weight * MLM + disc_weight * discriminator)."""

  rate: float = 0.15
  max_predictions: int = 20  # presets: config.mlm.max_predictions
  mask_prob: float = 0.85
  random_prob: float = 0.0
  generator_size: float = 0.25
  generator_layers: int = 0  # 0: the discriminator's depth
  temperature: float = 1.0
  gen_weight: float = 1.0
  disc_weight: float = 50.0

  def __post_init__(self):
    if self.temperature <= 0:
      raise ValueError(f"rtd.temperature must be positive, got {self.temperature}")
    if not 0 < self.generator_size <= 1:
      raise ValueError(f"rtd.generator_size must be in (0, 1], got {self.generator_size}")


@objectives.register
@dataclasses.dataclass(frozen=True)
class ReplacedTokenDetection(Objective):
  name = "rtd"
  Config = RTDConfig

  masking: MaskingConfig
  special: SpecialIds
  generator_size: float = 0.25
  generator_layers: int | None = None
  temperature: float = 1.0
  gen_weight: float = 1.0
  disc_weight: float = 50.0

  @classmethod
  def from_config(cls, config, special):
    c = cls.section(config)
    masking = MaskingConfig(rate=c.rate, max_predictions=c.max_predictions,
                            mask_prob=c.mask_prob, random_prob=c.random_prob)
    return cls(masking=masking, special=special, generator_size=c.generator_size,
               generator_layers=c.generator_layers or None, temperature=c.temperature,
               gen_weight=c.gen_weight, disc_weight=c.disc_weight)

  runs_encoder = True  # the generator reads its masked ids, the encoder its samples

  @classmethod
  def for_seq_len(cls, config, seq_len):
    c = config[cls.name]
    c.max_predictions = max(20, round(seq_len * c.rate + 0.5))

  def torch_peer(self):
    return "objectives.torch_peers:electra"

  def generator(self, encoder_config: EncoderConfig) -> EncoderConfig:
    return generator_config(encoder_config, self.generator_size, self.generator_layers)

  hf_head_kind = "rtd"

  @classmethod
  def hf_head(cls, encoder_config, name):
    return DiscriminatorLogits(encoder_config, name=name)

  @classmethod
  def towers(cls):
    return (GENERATOR,)

  @classmethod
  def import_tower(cls, tower, encoder_config, params, tower_config, tower_params):
    """An ElectraForMaskedLM generator beside its ElectraForPreTraining discriminator:
    params[name] gains "generator" (its Encoder without the shared tables: its projection,
    when it has one, and its layers) and "generator_head"; the generator_size it implies is
    its hidden ratio (true of the released small/base/large pairs)."""
    if tower != GENERATOR.name:
      return super().import_tower(tower, encoder_config, params, tower_config, tower_params)
    d_flat, g_flat = _flat(params["encoder"]), _flat(tower_params["encoder"])
    for path in sorted(p for p in g_flat if p.startswith(SHARED)):
      if path not in d_flat or d_flat[path].shape != g_flat[path].shape or not np.array_equal(
          d_flat[path], g_flat[path]):
        raise ValueError(
            f"the generator's {path!r} differs from the discriminator's: ELECTRA shares the "
            "embedding tables and embedding LayerNorm between its towers (a pair with "
            "untied generator embeddings is not supported)")
    disc, gen = encoder_config, tower_config
    layers = gen.num_layers if gen.num_layers != disc.num_layers else None
    size = gen.hidden_size / disc.hidden_size
    expected = generator_config(disc, size, layers)
    wrong = [f"{f}={getattr(gen, f)!r} (expected {getattr(expected, f)!r})"
             for f in GENERATOR_FIELDS if getattr(gen, f) != getattr(expected, f)]
    head_act = lambda c: c.head_act or c.hidden_act  # noqa: E731
    if head_act(gen) != head_act(expected):
      wrong.append(f"head activation {head_act(gen)!r} (expected {head_act(expected)!r})")
    if wrong:
      raise ValueError(f"not the discriminator's generator at generator_size={size:g} "
                       f"(objectives.rtd.generator_config): {'; '.join(wrong)}")
    encoder = tower_params["encoder"]
    generator = {k: v for k, v in encoder.items() if k != "embeddings"}
    if "projection" in encoder["embeddings"]:
      generator["embeddings"] = {"projection": encoder["embeddings"]["projection"]}
    (head_group,) = GENERATOR.groups
    out = dict(params)
    out[cls.name] = {**params.get(cls.name, {}), "generator": generator,
                     "generator_head": tower_params[head_group]["head"]}
    section = {"generator_size": float(size), "generator_layers": layers or 0}
    return out, section, {"generator_size": size, "generator_layers": layers,
                          "config": expected}

  @classmethod
  def export_tower(cls, tower, encoder_config, params, section):
    """The generator as a standalone ELECTRA masked LM, with the discriminator's embedding
    tables and LayerNorm and the generator's own projection."""
    if tower != GENERATOR.name:
      return super().export_tower(tower, encoder_config, params, section)
    own = params.get(cls.name, {})
    if "generator" not in own or "generator_head" not in own:
      raise ValueError(f"this checkpoint has no ELECTRA generator (params[{cls.name!r}]"
                       "['generator'] and ['generator_head']): only an RTD run's has one")
    gen_cfg = generator_config(encoder_config, section.generator_size,
                               section.generator_layers or None)
    tables = {k: v for k, v in params["encoder"]["embeddings"].items() if k != "projection"}
    encoder = dict(own["generator"])
    encoder["embeddings"] = {**tables, **encoder.get("embeddings", {})}
    (head_group,) = GENERATOR.groups
    return gen_cfg, {"encoder": encoder, head_group: {"head": own["generator_head"]}}

  def corrupt(self, clean, key):
    mask_key, sample_key = jax.random.split(key)
    per_example = lambda k: jax.vmap(lambda i: jax.random.fold_in(k, i))(clean["example_id"])  # noqa: E731
    out = mask_batch(per_example(mask_key), clean["input_ids"], clean["word_ids"],
                     clean["attention_mask"], self.masking, mask_id=self.special.mask,
                     first_regular_id=self.special.first_regular,
                     vocab_size=self.special.vocab_size)
    out["rtd_sample_keys"] = jax.vmap(jax.random.key_data)(per_example(sample_key))
    return out

  def head(self, encoder_config, name):
    return RTDModule(encoder_config, self.generator(encoder_config), self.temperature,
                     self.special.vocab_size, name=name)

  def loss(self, outputs, inputs):
    gen_loss, gen_metrics = masked_lm_loss(outputs["generator_logits"], inputs["mlm_ids"],
                                           inputs["mlm_weights"], self.special.vocab_size)
    disc_loss, metrics = discriminator_loss(outputs["discriminator_logits"], outputs["labels"],
                                            inputs["attention_mask"])
    metrics["gen_loss"] = gen_metrics["loss"]
    metrics["gen_accuracy"] = gen_metrics["accuracy"]
    return self.gen_weight * gen_loss + self.disc_weight * disc_loss, metrics
