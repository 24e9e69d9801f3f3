"""Fine-tuning: downstream tasks, their data and metrics, on `bert_jax.train`'s loop.

  from bert_jax import finetune
  from configs.finetune import get_config
  config = get_config("bundled"); config.init = "runs/demo/pretrain"
  summary = finetune.finetune(config, "runs/ft_bundled")

Modules: tasks (heads and losses, as an objective), readers (bundled / files / tfds
records), features (tokenisation, QA windows and offsets), batching (dynamic padding,
bucketing), predictions (dev predictions and scores), scores (the metrics), restore (the
encoder of a pretraining workdir), loop (finetune), compare (demo: pretrained vs random init),
predict (predictions on new data, fill-mask: launch.predict), kfold (cross-validation
folds and out-of-fold scores), ensemble (averaged members), pseudo (pseudo-labelling):
launch.finetune_kit.
"""

from bert_jax.finetune.compare import demo, demo_config
from bert_jax.finetune.loop import Summary, finetune

__all__ = ["Summary", "demo", "demo_config", "finetune"]
