"""Training tricks of the one loop (`bert_jax.train.train_step`), each off by default.

- Adversarial training on the word-embedding table: FGM (Miyato et al. 2017, as the
  Kaggle fine-tuning kits apply it: one step, r = epsilon * g / ||g|| on the table) and
  PGD (Madry et al. 2018; K steps of alpha * g / ||g||, projected onto the epsilon ball).
  The step's gradient is the clean loss's plus the adversarial loss's at the perturbed
  table (the perturbation itself a constant), and the logged loss holds both terms.
- Freezing: parameters under the given paths see no gradient (stop_gradient, so XLA does
  not compute it) and have no optimizer state (bert_jax.optim's set_to_zero partition).
- Mixout (Lee et al. 2020): each weight of the encoder's dense kernels is replaced by its
  pretrained value with probability p, and the mixture rescaled so that its expectation
  is the current weight: (m * w0 + (1 - m) * w - p * w0) / (1 - p). Training only; the
  pretrained values live in the optimizer state (`keep_reference`), so they are
  checkpointed and restored with it.
- Weight averaging (EMA, SWA) is `average_params`, an optax transformation at the end of
  the chain: its state holds the average, which evaluation and the best checkpoint use.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

Path = tuple[str, ...]
WORD_EMBEDDINGS: Path = ("encoder", "embeddings", "word_embeddings", "embedding")
ADVERSARIAL_MODES = ("none", "fgm", "pgd")
AVERAGE_MODES = ("none", "ema", "swa")


def _names(path) -> Path:
  return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def _get(tree: Any, path: Path) -> Any:
  for k in path:
    tree = tree[k]
  return tree


def _set(tree: Any, path: Path, value: Any) -> Any:
  if not path:
    return value
  return dict(tree, **{path[0]: _set(tree[path[0]], path[1:], value)})


# ----------------------------------------------------------------------------- adversarial


@dataclasses.dataclass(frozen=True)
class Adversarial:
  mode: str = "none"  # none | fgm | pgd
  epsilon: float = 1.0  # the perturbation's l2 norm (FGM) or its bound (PGD)
  steps: int = 3  # PGD's K
  alpha: float = 0.3  # PGD's step length
  path: Path = WORD_EMBEDDINGS

  def __post_init__(self):
    if self.mode not in ADVERSARIAL_MODES:
      raise ValueError(f"adversarial.mode={self.mode!r} is not one of {ADVERSARIAL_MODES}")
    if self.mode != "none" and not self.epsilon > 0:
      raise ValueError(f"adversarial.epsilon={self.epsilon} must be > 0")
    if self.mode == "pgd" and (self.steps < 1 or not self.alpha > 0):
      raise ValueError(f"adversarial: PGD needs steps >= 1 and alpha > 0 "
                       f"(got steps={self.steps}, alpha={self.alpha})")


def attack_step(r: jax.Array, g: jax.Array, step_length: float, epsilon: float) -> jax.Array:
  """r + step_length * g / ||g||, projected back onto the ball ||r|| <= epsilon."""
  g = g.astype(jnp.float32)
  r = r + step_length * g / (jnp.linalg.norm(g) + 1e-12)
  norm = jnp.linalg.norm(r)
  return jnp.where(norm > epsilon, r * (epsilon / (norm + 1e-12)), r)


def adversarial_grad(grad_fn: Callable, adv: Adversarial) -> Callable:
  """grad_fn(params, key) -> ((loss, metrics), grads) made adversarial: the grads add the
  adversarial pass's; metrics gain "adversarial_loss" and "loss" is clean + adversarial."""
  if adv.mode == "none":
    return grad_fn
  steps, length = (1, adv.epsilon) if adv.mode == "fgm" else (adv.steps, adv.alpha)

  def fn(params, key):
    (loss, metrics), grads = grad_fn(params, key)
    table = _get(params, adv.path)
    r, g = jnp.zeros(table.shape, jnp.float32), _get(grads, adv.path)
    for t in range(steps):  # K is small and static: unrolled
      r = attack_step(r, g, length, adv.epsilon)
      attacked = _set(params, adv.path, table + jax.lax.stop_gradient(r).astype(table.dtype))
      (adv_loss, _), adv_grads = grad_fn(attacked, jax.random.fold_in(key, t + 1))
      g = _get(adv_grads, adv.path)
    grads = jax.tree.map(jnp.add, grads, adv_grads)
    one = jnp.ones((), jnp.float32)
    metrics = dict(metrics, adversarial_loss=(adv_loss, one),
                   adversarial_norm=(jnp.linalg.norm(r), one),
                   loss=(metrics["loss"][0] + adv_loss, metrics["loss"][1]))
    return (loss + adv_loss, metrics), grads

  return fn


# ----------------------------------------------------------------------------- freezing


def freeze(params: Any, frozen: tuple[Path, ...]) -> Any:
  """stop_gradient on every parameter under a `frozen` path prefix."""
  if not frozen:
    return params

  def one(path, x):
    names = _names(path)
    return jax.lax.stop_gradient(x) if any(names[:len(f)] == f for f in frozen) else x

  return jax.tree_util.tree_map_with_path(one, params)


def layer_paths(cfg: Any, embeddings: bool, bottom_layers: int) -> tuple[Path, ...]:
  """The encoder paths that freezing the embeddings and the bottom k layer modules means."""
  n = cfg.num_layer_groups or cfg.num_layers
  if not 0 <= bottom_layers <= n:
    raise ValueError(f"freeze.bottom_layers={bottom_layers} must be in 0..{n} (the layer "
                     "modules)")
  paths = [("encoder", "embeddings")] if embeddings else []
  return tuple(paths + [("encoder", f"layer_{i}") for i in range(bottom_layers)])


# ----------------------------------------------------------------------------- mixout


class ReferenceState(NamedTuple):
  params: Any  # the parameters the optimizer was initialised with (the pretrained ones)


def keep_reference() -> optax.GradientTransformation:
  """Holds the initial parameters in the optimizer state; updates pass unchanged."""
  return optax.GradientTransformation(
      lambda params: ReferenceState(jax.tree.map(jnp.asarray, params)),
      lambda updates, state, params=None: (updates, state))


def is_mixout_target(path: Path) -> bool:
  """The encoder's dense kernels (attention projections and FFN), as in Lee et al."""
  return path[:1] == ("encoder",) and path[-1] == "kernel"


def mixout(params: Any, reference: Any, p: float, key: jax.Array) -> Any:
  """Each targeted weight -> its reference with probability p, rescaled to keep the mean."""
  if p <= 0:
    return params
  leaves = jax.tree_util.tree_leaves_with_path(params)
  keys = dict(zip((_names(path) for path, _ in leaves),
                  jax.random.split(key, len(leaves))))

  def one(path, w, w0):
    names = _names(path)
    if not is_mixout_target(names):
      return w
    m = jax.random.bernoulli(keys[names], p, w.shape).astype(w.dtype)
    w0 = jax.lax.stop_gradient(w0).astype(w.dtype)
    return (m * w0 + (1 - m) * w - p * w0) / (1 - p)

  return jax.tree_util.tree_map_with_path(one, params, reference)


# ----------------------------------------------------------------------------- averaging


class AverageState(NamedTuple):
  count: jax.Array  # steps seen (EMA) or snapshots averaged (SWA)
  step: jax.Array
  average: Any


@dataclasses.dataclass(frozen=True)
class Averaging:
  mode: str = "none"  # none | ema | swa
  decay: float = 0.999  # EMA
  start: int = 0  # first step averaged (before it the average is the weights themselves)
  every: int = 1  # SWA: a snapshot every `every` steps from `start`

  def __post_init__(self):
    if self.mode not in AVERAGE_MODES:
      raise ValueError(f"average.mode={self.mode!r} is not one of {AVERAGE_MODES}")
    if self.mode == "ema" and not 0 < self.decay < 1:
      raise ValueError(f"average.decay={self.decay} must be in (0, 1)")
    if self.every < 1 or self.start < 0:
      raise ValueError(f"average: every={self.every} must be >= 1, start={self.start} >= 0")


def average_params(avg: Averaging) -> optax.GradientTransformation:
  """EMA or SWA of the weights after each update; updates pass unchanged.

  EMA: a <- decay * a + (1 - decay) * w from step `start` on (optax.incremental_update).
  SWA: the running mean of the snapshots at steps start, start + every, ...
  Before `start` the average follows the weights.
  """

  def init(params):
    return AverageState(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32),
                        jax.tree.map(jnp.asarray, params))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("average_params needs the parameters")
    new = optax.apply_updates(params, updates)
    step = state.step + 1
    started = step >= avg.start
    where = lambda c, x, y: jax.tree.map(lambda a, b: jnp.where(c, a, b), x, y)  # noqa: E731
    if avg.mode == "ema":  # the first averaged step starts the average at w
      average = where(started & (state.count > 0),
                      optax.incremental_update(new, state.average, 1.0 - avg.decay), new)
      count = state.count + started.astype(jnp.int32)
    else:
      snap = started & ((step - avg.start) % avg.every == 0)
      count = state.count + snap.astype(jnp.int32)
      mean = optax.incremental_update(
          new, state.average, 1.0 / jnp.maximum(count, 1).astype(jnp.float32))
      average = where(started, where(snap, mean, state.average), new)
    return updates, AverageState(count, step, average)

  return optax.GradientTransformation(init, update)


def find_state(opt_state: Any, cls: type) -> Any:
  """The first `cls` (AverageState, ReferenceState) in an optimizer state, or None."""
  hits = [s for s in jax.tree_util.tree_leaves(
      opt_state, is_leaf=lambda x: isinstance(x, cls)) if isinstance(s, cls)]
  return hits[0] if hits else None


# ----------------------------------------------------------------------------- the bundle


@dataclasses.dataclass(frozen=True)
class Tricks:
  """What `train.train_step` applies; the defaults change nothing."""

  adversarial: Adversarial = Adversarial()
  frozen: tuple[Path, ...] = ()
  mixout: float = 0.0
  averaging: Averaging = Averaging()

  def __post_init__(self):
    if not 0 <= self.mixout < 1:
      raise ValueError(f"mixout={self.mixout} must be in [0, 1)")

  def wrap_optimizer(self, tx: optax.GradientTransformation) -> optax.GradientTransformation:
    parts = [tx]
    if self.mixout > 0:
      parts.append(keep_reference())
    if self.averaging.mode != "none":
      parts.append(average_params(self.averaging))
    return optax.chain(*parts) if len(parts) > 1 else tx

  def grad_fn(self, loss_fn: Callable, opt_state: Any) -> Callable:
    """loss_fn(params, key) -> (loss, metrics) => (params, key) -> ((loss, m), grads)."""
    reference = find_state(opt_state, ReferenceState) if self.mixout > 0 else None

    def loss(params, key):
      params = freeze(params, self.frozen)
      if reference is not None:
        params = mixout(params, reference.params, self.mixout, jax.random.fold_in(key, 7919))
      return loss_fn(params, key)

    return adversarial_grad(jax.value_and_grad(loss, has_aux=True), self.adversarial)

  def eval_params(self, params: Any, opt_state: Any) -> Any:
    """The weights evaluation (and the best checkpoint) use: the average where one is kept."""
    state = find_state(opt_state, AverageState) if self.averaging.mode != "none" else None
    return params if state is None else state.average
