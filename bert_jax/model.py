"""The model: the shared encoder plus the selected objectives' heads.

Parameters live under "encoder" (what fine-tuning and export load) and the subtrees each
objective declares in `param_groups()` (by default one named after it: "mlm", "nsp", ...).
The encoder runs once over each distinct input the objectives read (`Composition.passes`):
the clean batch, or a view such as MLM's masked ids shared by MLM and NSP.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from bert_jax.encoder import Encoder, EncoderConfig


def as_composition(objs: Any):
  """A Composition, or a tuple of objectives (weight 1 each) made into one."""
  import objectives
  if isinstance(objs, objectives.Composition):
    return objs
  return objectives.compose(tuple(objectives.WeightedObjective(o, 1.0) for o in objs))


class PretrainModel(nn.Module):
  encoder_config: EncoderConfig
  composition: Any  # objectives.Composition (frozen, hashable), or a tuple of objectives

  @nn.compact
  def __call__(self, batch: dict[str, Any], *, deterministic: bool) -> dict[str, Any]:
    """`batch`: Composition.corrupt's {"clean", "views", "own"} -> {objective: outputs}.

    A flat batch (no "clean" key) is one objective's inputs as `Composition.inputs` gives
    them (e.g. a corrupted batch made by `objectives.corrupt_one`, or a fine-tuning batch)."""
    comp = as_composition(self.composition)
    if "clean" not in batch:
      batch = {"clean": batch, "views": tuple(batch for _ in comp.views), "own": {}}
    encoder = Encoder(self.encoder_config, name="encoder")
    encoded = {}
    for i in comp.passes():
      src = batch["clean"] if i is None else batch["views"][i]
      clean = batch["clean"]
      # A view may bring its own attention mask and segments (tokens deleted, moved).
      encoded[i] = encoder(src["input_ids"], src.get("segment_ids", clean.get("segment_ids")),
                           src.get("attention_mask", clean["attention_mask"]),
                           deterministic=deterministic)
    out = {}
    for w in comp.objectives:
      o = w.objective
      inputs = comp.inputs(batch, o)
      out[o.name] = o.head(self.encoder_config, name=o.name)(
          None if o.runs_encoder else encoded[comp.view_index(o)], inputs, encoder,
          deterministic=deterministic)
    return out
