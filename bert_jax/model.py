"""The pretraining model: the shared encoder plus the selected objectives' heads.

Parameters live under "encoder" (what fine-tuning and export load) and one subtree per
objective, named after it ("mlm", "nsp", "rtd", ...).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from bert_jax.encoder import Encoder, EncoderConfig


class PretrainModel(nn.Module):
  encoder_config: EncoderConfig
  objectives: tuple[Any, ...]  # objectives.Objective instances (frozen dataclasses)

  @nn.compact
  def __call__(self, batch: dict[str, Any], *, deterministic: bool) -> dict[str, Any]:
    encoder = Encoder(self.encoder_config, name="encoder")
    encoded = None
    if any(o.uses_shared_forward for o in self.objectives):
      encoded = encoder(batch["input_ids"], batch.get("segment_ids"), batch["attention_mask"],
                        deterministic=deterministic)
    return {o.name: o.head(self.encoder_config, name=o.name)(
        encoded, batch, encoder, deterministic=deterministic) for o in self.objectives}
