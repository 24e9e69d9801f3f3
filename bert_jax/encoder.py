"""The one Flax encoder shared by every objective.

BERT's architecture (learned absolute positions, token types, post-LN, GELU) with the
variants other encoder families need as options of `EncoderConfig`, never as forks:
pre-LN, factorized embeddings with a projection (ALBERT, ELECTRA), cross-layer sharing in
groups (ALBERT), position offsets (RoBERTa), no token types (RoBERTa, DistilBERT), and
XLNet's relative attention (sinusoidal relative positions with content and position biases,
segment-relative encodings, no embedding LayerNorm, no attention biases), and MobileBERT's
body: bottlenecks around each layer (attention and FFNs at `intra_bottleneck_size`, the
residual stream between layers at `hidden_size`), stacked FFNs, NoNorm (an elementwise
affine map in place of every LayerNorm), trigram word inputs projected before positions
and token types are added.

Two-stream attention (XLNet's permutation LM): an optional query stream runs through every
layer with the content stream's weights; its queries come from the query stream, its keys
and values from the content stream, under its own mask. It may cover only some positions
(`query_positions`), e.g. the prediction targets.

Every parameter carries logical axis names (vocab, embed, embed_proj, heads, kv, mlp); the
rules that map them onto the mesh (data, fsdp, tensor) live in the config and
`bert_jax.sharding`. "embed" is the width a module works at (inside a MobileBERT bottleneck,
the intra-block width); "embed_proj" the other side of a projection between two widths.
The encoder does not know which objective runs: it maps ids to hidden states.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

ACTIVATIONS = {
    "gelu": functools.partial(nn.gelu, approximate=False),  # BERT's erf GELU
    "gelu_new": functools.partial(nn.gelu, approximate=True),  # tanh approximation
    "relu": nn.relu,
    "silu": nn.silu,
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "explicit")
POSITION_EMBEDDINGS = ("absolute", "relative")
NORMALIZATIONS = ("layer_norm", "no_norm")  # transformers' MobileBERT normalization_type
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """Architecture of the encoder. Defaults are BERT-base."""

  vocab_size: int = 30522
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  # Factorized embeddings (ALBERT, ELECTRA): tables of this width, projected to hidden.
  embedding_size: int | None = None
  max_position_embeddings: int = 512
  # RoBERTa counts positions from padding_idx + 1 = 2; padding tokens sit at offset - 1.
  position_offset: int = 0
  type_vocab_size: int = 2  # 0: no token-type embeddings
  hidden_act: str = "gelu"
  # Activation of the MLM head's transform; None: hidden_act. (RoBERTa's and ELECTRA's
  # generator heads always use GELU whatever the encoder's activation.)
  head_act: str | None = None
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  layer_norm_eps: float = 1e-12
  initializer_range: float = 0.02
  pre_layer_norm: bool = False
  # ALBERT: layers share parameters in this many groups (1 = all layers share one).
  num_layer_groups: int | None = None
  dtype: str = "float32"  # compute dtype; parameters stay in param_dtype
  param_dtype: str = "float32"
  remat: str = "none"  # per-layer rematerialisation policy: none | full | dots
  attention_impl: str = "auto"  # auto | xla | cudnn | explicit
  # "absolute": a learned table (BERT); "relative": XLNet/Transformer-XL sinusoidal
  # relative encodings in every attention layer, with content (r_w_bias) and position
  # (r_r_bias) biases; max_position_embeddings then only bounds the sequence length.
  position_embedding: str = "absolute"
  # XLNet: a segment term in attention (same or different segment: seg_embed, r_s_bias).
  relative_segments: bool = False
  embedding_norm: bool = True  # LayerNorm on the embeddings (XLNet: none)
  attention_bias: bool = True  # biases of the query/key/value/output projections (XLNet: none)
  # MobileBERT. Each layer maps its input to this width (dense + norm), runs attention and
  # its FFNs there, and maps back (dense, dropout, norm with a residual to its input).
  intra_bottleneck_size: int | None = None
  # Queries, keys and values from that input bottleneck (else values from the layer input).
  use_bottleneck_attention: bool = False
  # Queries and keys from a second bottleneck of their own, values from the layer input.
  key_query_shared_bottleneck: bool = False
  num_feedforward_networks: int = 1  # FFNs per layer, each with its residual and norm
  normalization: str = "layer_norm"  # every norm of the encoder; "no_norm": scale * x + bias
  # The embedding projection maps the word vectors before positions and token types are
  # added (their tables then hidden_size wide), and the MLM head decodes at hidden width
  # (word embeddings + learned extra rows). False: ALBERT's/ELECTRA's order, projection last.
  project_word_embeddings: bool = False
  trigram_input: bool = False  # word vectors as [next, own, previous] (3 x embedding_size)
  # eps of the embedding norm and of each layer's ffn_norm; None: layer_norm_eps.
  # (transformers' MobileBERT leaves those two LayerNorms at torch's default, 1e-5.)
  block_norm_eps: float | None = None
  pooler_activation: bool = True  # pooled = tanh(dense(h[CLS])); False: h[CLS] as it is
  # Structured pruning (bert_jax.compress): per layer, the original indices of the heads
  # removed from it (transformers' config.pruned_heads as a tuple); None: every head kept.
  # Layer i then has num_heads - len(pruned_heads[i]) heads of head_dim each.
  pruned_heads: tuple | None = None  # tuple[tuple[int, ...], ...]: one per layer

  def __post_init__(self):
    def check(ok, field, msg):
      if not ok:
        raise ValueError(f"EncoderConfig.{field}: {msg}")

    check(self.inner_size % self.num_heads == 0, "num_heads",
          f"the attention width {self.inner_size} is not divisible by num_heads "
          f"{self.num_heads}")
    check(self.hidden_act in ACTIVATIONS, "hidden_act",
          f"{self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")
    check(self.head_act is None or self.head_act in ACTIVATIONS, "head_act",
          f"{self.head_act!r} is not None or one of {sorted(ACTIVATIONS)}")
    check(self.dtype in DTYPES, "dtype", f"{self.dtype!r} is not one of {sorted(DTYPES)}")
    check(self.param_dtype in DTYPES, "param_dtype",
          f"{self.param_dtype!r} is not one of {sorted(DTYPES)}")
    check(self.remat in REMAT_POLICIES, "remat",
          f"{self.remat!r} is not one of {sorted(REMAT_POLICIES)}")
    check(self.attention_impl in ATTENTION_IMPLS, "attention_impl",
          f"{self.attention_impl!r} is not one of {ATTENTION_IMPLS}")
    check(self.position_embedding in POSITION_EMBEDDINGS, "position_embedding",
          f"{self.position_embedding!r} is not one of {POSITION_EMBEDDINGS}")
    check(self.position_embedding == "absolute" or self.hidden_size % 2 == 0,
          "hidden_size", "relative (sinusoidal) encodings need an even hidden_size")
    if self.num_layer_groups is not None:
      check(1 <= self.num_layer_groups <= self.num_layers
            and self.num_layers % self.num_layer_groups == 0, "num_layer_groups",
            f"{self.num_layer_groups} must divide num_layers {self.num_layers}")
    for name in ("vocab_size", "hidden_size", "num_layers", "intermediate_size",
                 "max_position_embeddings", "num_feedforward_networks"):
      check(getattr(self, name) > 0, name, "must be positive")
    check(self.normalization in NORMALIZATIONS, "normalization",
          f"{self.normalization!r} is not one of {NORMALIZATIONS}")
    bottleneck = self.intra_bottleneck_size is not None
    check(not bottleneck or self.intra_bottleneck_size > 0, "intra_bottleneck_size",
          "must be positive")
    check(bottleneck or not (self.use_bottleneck_attention or self.key_query_shared_bottleneck),
          "use_bottleneck_attention", "bottleneck attention inputs need intra_bottleneck_size")
    check(not (self.use_bottleneck_attention and self.key_query_shared_bottleneck),
          "key_query_shared_bottleneck", "choose one of it and use_bottleneck_attention")
    check(not self.pre_layer_norm or (not bottleneck and self.num_feedforward_networks == 1),
          "pre_layer_norm", "MobileBERT's bottlenecks and stacked FFNs are post-LN only")
    check(self.project_word_embeddings or not self.trigram_input, "trigram_input",
          "needs project_word_embeddings (the trigram is projected to hidden_size)")
    if self.pruned_heads is not None:
      check(self.num_layer_groups is None, "pruned_heads",
            "cannot prune heads of layers shared across depth (num_layer_groups)")
      check(len(self.pruned_heads) == self.num_layers, "pruned_heads",
            f"needs one entry per layer ({self.num_layers}), got {len(self.pruned_heads)}")
      for i, gone in enumerate(self.pruned_heads):
        check(len(set(gone)) == len(gone) and all(0 <= h < self.num_heads for h in gone)
              and len(gone) < self.num_heads, "pruned_heads",
              f"layer {i}: {list(gone)} must be distinct heads in 0..{self.num_heads - 1}, "
              "leaving at least one")

  @property
  def inner_size(self) -> int:
    """The width attention and the FFNs work at (MobileBERT's true_hidden_size)."""
    return self.intra_bottleneck_size or self.hidden_size

  @property
  def head_dim(self) -> int:
    return self.inner_size // self.num_heads

  def layer_heads(self, i: int) -> int:
    """Heads of layer i (fewer than num_heads where pruned_heads removed some)."""
    return self.num_heads - (len(self.pruned_heads[i]) if self.pruned_heads else 0)

  @property
  def embed_size(self) -> int:
    return self.embedding_size or self.hidden_size

  @property
  def embedding_projection(self) -> bool:
    return self.embed_size != self.hidden_size or self.trigram_input

  @classmethod
  def from_dict(cls, d: Any) -> "EncoderConfig":
    d = dict(d)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"Unknown EncoderConfig fields {unknown}; valid: {sorted(names)}")
    if d.get("pruned_heads") is not None:  # JSON lists -> the hashable tuples
      d["pruned_heads"] = tuple(tuple(int(h) for h in layer) for layer in d["pruned_heads"])
    return cls(**d)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _dense_init(cfg: EncoderConfig, axes: tuple[str | None, ...]):
  return nn.with_logical_partitioning(
      nn.initializers.truncated_normal(cfg.initializer_range), axes)


def _zeros(axes):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def _ones(axes):
  return nn.with_logical_partitioning(nn.initializers.ones_init(), axes)


class NoNorm(nn.Module):
  """MobileBERT's NoNorm: scale * x + bias, no statistics (same parameters as LayerNorm)."""

  axis_name: str = "embed"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    shape = (x.shape[-1],)
    scale = self.param("scale", _ones((self.axis_name,)), shape, jnp.float32)
    bias = self.param("bias", _zeros((self.axis_name,)), shape, jnp.float32)
    return (x * scale.astype(self.dtype) + bias.astype(self.dtype)).astype(self.dtype)


class LayerNorm(nn.Module):
  """LayerNorm (or NoNorm) over the last axis, with logically partitioned scale and bias."""

  eps: float
  axis_name: str = "embed"
  dtype: Any = jnp.float32
  no_norm: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.no_norm:
      return NoNorm(self.axis_name, self.dtype, name="norm")(x)
    return nn.LayerNorm(
        epsilon=self.eps, dtype=self.dtype,
        scale_init=_ones((self.axis_name,)), bias_init=_zeros((self.axis_name,)),
        name="norm")(x)


def _norm(cfg: EncoderConfig, name: str | None = None, eps: float | None = None) -> LayerNorm:
  """An encoder norm of cfg.normalization's kind."""
  return LayerNorm(cfg.layer_norm_eps if eps is None else eps, dtype=DTYPES[cfg.dtype],
                   no_norm=cfg.normalization == "no_norm", name=name)


def attention_mask_from_padding(attention_mask: Array) -> Array:
  """[B, L] 0/1 padding mask -> [B, 1, 1, L] boolean key mask."""
  return attention_mask[:, None, None, :].astype(bool)


def _as_4d_mask(mask: Array) -> Array:
  if mask.ndim == 2:  # [B, L] padding
    return attention_mask_from_padding(mask)
  if mask.ndim == 3:  # [B, Lq, Lk] full mask (permutation LM, packed sequences)
    return mask[:, None, :, :].astype(bool)
  if mask.ndim == 4:
    return mask.astype(bool)
  raise ValueError(f"attention mask must have 2, 3 or 4 dims, got shape {mask.shape}")


def sinusoid_relative_encodings(klen: int, qlen: int, dim: int) -> Array:
  """XLNet's relative encodings [klen + qlen, dim] for distances klen, klen-1, .., -qlen+1:
  [sin(d * f), cos(d * f)] with f = 10000^(-2k/dim) (Transformer-XL, attn_type="bi")."""
  distance = jnp.arange(klen, -qlen, -1, dtype=jnp.float32)
  inv_freq = 1.0 / (10000 ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  x = distance[:, None] * inv_freq[None, :]
  return jnp.concatenate([jnp.sin(x), jnp.cos(x)], axis=-1)


def rel_shift(x_BxNxQxR: Array, klen: int) -> Array:
  """XLNet's rel_shift_bnij: scores against the distances klen..-qlen+1 [.., Q, R] ->
  scores against the keys [.., Q, klen], entry [i, j] taken at distance i - j."""
  b, n, q, r = x_BxNxQxR.shape
  x = x_BxNxQxR.reshape(b, n, r, q)[:, :, 1:, :]
  return x.reshape(b, n, q, r - 1)[..., :klen]


def rel_gather(x_BxNxQxR: Array, q_positions_BxQ: Array, klen: int) -> Array:
  """rel_shift for queries at arbitrary positions: entry [i, j] at distance pos(i) - j."""
  index = klen - q_positions_BxQ[:, :, None] + jnp.arange(klen)[None, None, :]
  return jnp.take_along_axis(x_BxNxQxR, index[:, None], axis=-1)


class SelfAttention(nn.Module):
  """Multi-head attention; queries may come from a second stream (two-stream PLM).

  With relative positions (XLNet), `rel` holds "pos_emb" (the sinusoidal encodings of the
  distances klen..-qlen+1, [R, hidden]), optionally "q_pos" ([B, Lq] sequence positions of
  the queries; default 0..L-1) and "seg_diff" ([B, Lq, Lk] bool, relative_segments).
  `x_v`: the values' input when it is not the keys' (MobileBERT's key/query bottleneck).
  `num_heads`: this layer's heads when pruning removed some (default cfg.num_heads).
  A "head_gates" variable "gate" ([heads] or [B, heads]), when the caller passes that
  collection, multiplies each head's output (Michel et al. 2019's xi_h; bert_jax.compress).
  """

  cfg: EncoderConfig
  num_heads: int | None = None

  @nn.compact
  def __call__(self, x_q: Array, x_kv: Array, mask: Array, *, deterministic: bool,
               return_probs: bool = False, rel: dict[str, Array] | None = None,
               x_v: Array | None = None) -> tuple[Array, Array | None]:
    cfg = self.cfg
    dtype, pdtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
    n_heads = self.num_heads or cfg.num_heads
    proj = functools.partial(
        nn.DenseGeneral, features=(n_heads, cfg.head_dim), dtype=dtype,
        param_dtype=pdtype, kernel_init=_dense_init(cfg, ("embed", "heads", "kv")),
        bias_init=_zeros(("heads", "kv")), use_bias=cfg.attention_bias)
    q = proj(name="query")(x_q)
    k = proj(name="key")(x_kv)
    v = proj(name="value")(x_kv if x_v is None else x_v)
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
    k = nn.with_logical_constraint(k, ("batch", "length", "heads", "kv"))
    v = nn.with_logical_constraint(v, ("batch", "length", "heads", "kv"))
    scale = cfg.head_dim ** -0.5

    bias = None  # [B, heads, Lq, Lk] fp32 scores added to the (scaled) content scores
    if cfg.position_embedding == "relative":
      if rel is None:
        raise ValueError("relative attention needs the relative encodings (rel)")
      head_param = lambda name, shape, axes: self.param(  # noqa: E731
          name, _dense_init(cfg, axes), shape, pdtype).astype(dtype)
      hd = (n_heads, cfg.head_dim)
      r_w_bias = head_param("r_w_bias", hd, ("heads", "kv"))
      r_r_bias = head_param("r_r_bias", hd, ("heads", "kv"))
      k_r = proj(name="relative", use_bias=False)(rel["pos_emb"].astype(dtype))  # [R, n, d]
      bd = jnp.einsum("bqnd,rnd->bnqr", q + r_r_bias, k_r).astype(jnp.float32)
      klen = x_kv.shape[1]
      bias = (rel_gather(bd, rel["q_pos"], klen) if "q_pos" in rel else rel_shift(bd, klen))
      if cfg.relative_segments:
        r_s_bias = head_param("r_s_bias", hd, ("heads", "kv"))
        seg_embed = head_param("seg_embed", (2,) + hd, (None, "heads", "kv"))
        ef = jnp.einsum("bqnd,snd->bnqs", q + r_s_bias, seg_embed).astype(jnp.float32)
        bias = bias + jnp.where(rel["seg_diff"][:, None], ef[..., 1:], ef[..., :1])
      bias = bias * scale
      q = q + r_w_bias

    use_dropout = not deterministic and cfg.attention_dropout > 0
    # The fused path has no dropout on probabilities and does not return them.
    explicit = cfg.attention_impl == "explicit" or use_dropout or return_probs
    probs = None
    if explicit:
      logits = jnp.einsum("bqhd,bkhd->bhqk", q * scale, k).astype(jnp.float32)
      if bias is not None:
        logits = logits + bias
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
      probs = jax.nn.softmax(logits, axis=-1)
      dropped = probs
      if use_dropout:
        dropped = nn.Dropout(cfg.attention_dropout)(probs, deterministic=False)
      ctx = jnp.einsum("bhqk,bkhd->bqhd", dropped.astype(dtype), v)
    else:
      impl = fused_attention_impl(cfg.attention_impl, jax.default_backend(), q.dtype,
                                  q.shape[-1])
      if impl == "cudnn":
        # jax turns the mask into a cuDNN bias and requires its last two dims to be
        # [Lq, Lk]: a [B, 1, 1, Lk] key mask would raise (and "auto" fall back to XLA).
        mask = jnp.broadcast_to(mask, mask.shape[:2] + (q.shape[1], k.shape[1]))
      attend = functools.partial(jax.nn.dot_product_attention, q, k, v,
                                 bias=None if bias is None else bias.astype(dtype), mask=mask)
      try:
        ctx = attend(implementation=impl)
      except (NotImplementedError, RuntimeError, ValueError):
        if cfg.attention_impl != "auto" or impl == "xla":
          raise
        ctx = attend(implementation="xla")  # this GPU / cuDNN cannot: the XLA kernel
    if self.has_variable("head_gates", "gate"):
      gate = self.get_variable("head_gates", "gate")
      ctx = ctx * jnp.reshape(gate, (-1 if gate.ndim == 2 else 1, 1, n_heads, 1)).astype(dtype)
    ctx = nn.with_logical_constraint(ctx, ("batch", "length", "heads", "kv"))
    out = nn.DenseGeneral(
        features=cfg.inner_size, axis=(-2, -1), dtype=dtype, param_dtype=pdtype,
        kernel_init=_dense_init(cfg, ("heads", "kv", "embed")),
        bias_init=_zeros(("embed",)), use_bias=cfg.attention_bias, name="output")(ctx)
    return out, probs


def fused_attention_impl(requested: str, backend: str, dtype, head_dim: int) -> str:
  """The kernel behind `attention_impl`: "auto" takes cuDNN's fused (flash) attention on a
  GPU where it applies (16-bit inputs, head size a multiple of 8 up to 128) and XLA's
  otherwise; an explicit choice is kept (and fails loudly where it cannot run)."""
  if requested != "auto":
    return requested
  cudnn_ok = (backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
              and head_dim % 8 == 0 and head_dim <= 128)
  return "cudnn" if cudnn_ok else "xla"


class FeedForward(nn.Module):
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool) -> Array:
    cfg = self.cfg
    dtype, pdtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
    h = nn.Dense(cfg.intermediate_size, dtype=dtype, param_dtype=pdtype,
                 kernel_init=_dense_init(cfg, ("embed", "mlp")),
                 bias_init=_zeros(("mlp",)), name="intermediate")(x)
    h = ACTIVATIONS[cfg.hidden_act](h)
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    return nn.Dense(cfg.inner_size, dtype=dtype, param_dtype=pdtype,
                    kernel_init=_dense_init(cfg, ("mlp", "embed")),
                    bias_init=_zeros(("embed",)), name="output")(h)


class Layer(nn.Module):
  """One transformer layer, post-LN (BERT) or pre-LN.

  MobileBERT (post-LN): attention, its norm, the extra FFNs (ffn_stack_j, each with its
  residual and norm) and the last FFN work at `inner_size`, between an input bottleneck
  (the residual of the attention) and an output bottleneck back to hidden_size (residual:
  the layer's input). As in transformers, dropout inside a bottleneck only follows the
  output projection.

  With `query` given, the same weights also run the query stream of two-stream
  attention: queries from `query`, keys and values from the content stream `x` (the
  layer's input, as in XLNet), then the same residual, LayerNorms and feed-forward.
  `rel` / `query_rel`: each stream's relative-attention inputs (see SelfAttention).
  """

  cfg: EncoderConfig
  num_heads: int | None = None  # this layer's heads after pruning (default cfg.num_heads)

  @nn.compact
  def __call__(self, x: Array, mask: Array, deterministic: bool,
               query: Array | None = None, query_mask: Array | None = None,
               return_probs: bool = False, rel: dict[str, Array] | None = None,
               query_rel: dict[str, Array] | None = None):
    cfg = self.cfg
    attention = SelfAttention(cfg, self.num_heads, name="attention")
    attention_norm = _norm(cfg, "attention_norm")
    ffn = FeedForward(cfg, name="ffn")
    ffn_norm = _norm(cfg, "ffn_norm", cfg.block_norm_eps)
    stack = [(FeedForward(cfg, name=f"ffn_stack_{j}"), _norm(cfg, f"ffn_stack_norm_{j}"))
             for j in range(cfg.num_feedforward_networks - 1)]
    drop = nn.Dropout(cfg.hidden_dropout)
    bottleneck = cfg.intra_bottleneck_size is not None
    if bottleneck:
      dense = functools.partial(nn.Dense, dtype=DTYPES[cfg.dtype],
                                param_dtype=DTYPES[cfg.param_dtype])
      narrow = lambda name: dense(  # noqa: E731
          cfg.inner_size, kernel_init=_dense_init(cfg, ("embed", "embed_proj")),
          bias_init=_zeros(("embed_proj",)), name=name)
      b_input, b_input_norm = narrow("bottleneck_input"), _norm(cfg, "bottleneck_input_norm")
      if cfg.key_query_shared_bottleneck:
        b_qk, b_qk_norm = narrow("bottleneck_attention"), _norm(cfg, "bottleneck_attention_norm")
      b_output = dense(cfg.hidden_size, kernel_init=_dense_init(cfg, ("embed_proj", "embed")),
                       bias_init=_zeros(("embed",)), name="bottleneck_output")
      b_output_norm = _norm(cfg, "bottleneck_output_norm")
    inner_drop = (lambda y: y) if bottleneck else (  # noqa: E731
        lambda y: drop(y, deterministic=deterministic))

    def attention_inputs(h_q, kv):
      """(residual, queries' input, keys' input, values' input) of the attention."""
      if not bottleneck:
        return h_q, h_q, kv, kv
      res = b_input_norm(b_input(h_q))
      if cfg.use_bottleneck_attention:
        kv_in = b_input_norm(b_input(kv))
        return res, res, kv_in, kv_in
      if cfg.key_query_shared_bottleneck:
        return res, b_qk_norm(b_qk(h_q)), b_qk_norm(b_qk(kv)), kv
      return res, h_q, kv, kv

    def block(h_q, kv_normed, m, probs_wanted, r):
      # kv_normed: the (already normalised, for pre-LN) content stream used as keys/values.
      if cfg.pre_layer_norm:
        a, probs = attention(attention_norm(h_q), kv_normed, m, deterministic=deterministic,
                             return_probs=probs_wanted, rel=r)
        h = h_q + drop(a, deterministic=deterministic)
        f = ffn(ffn_norm(h), deterministic=deterministic)
        return h + drop(f, deterministic=deterministic), probs
      res, q_in, k_in, v_in = attention_inputs(h_q, kv_normed)
      a, probs = attention(q_in, k_in, m, deterministic=deterministic,
                           return_probs=probs_wanted, rel=r, x_v=v_in)
      h = attention_norm(res + inner_drop(a))
      for stacked_ffn, stacked_norm in stack:  # transformers: no dropout in these
        h = stacked_norm(h + stacked_ffn(h, deterministic=deterministic))
      out = ffn_norm(h + inner_drop(ffn(h, deterministic=deterministic)))
      if bottleneck:
        out = b_output_norm(h_q + drop(b_output(out), deterministic=deterministic))
      return out, probs

    kv = attention_norm(x) if cfg.pre_layer_norm else x
    out, probs = block(x, kv, mask, return_probs, rel)
    out = nn.with_logical_constraint(out, ("batch", "length", "embed"))
    q_out = None
    if query is not None:
      q_out, _ = block(query, kv, query_mask, False, query_rel)
      q_out = nn.with_logical_constraint(q_out, ("batch", "length", "embed"))
    return out, q_out, probs


def trigram(x_BxLxE: Array) -> Array:
  """MobileBERT's trigram input: each position's vector between its right and left
  neighbours' ([next, own, previous], zeros past the ends) -> [B, L, 3E]."""
  nxt = jnp.pad(x_BxLxE[:, 1:], ((0, 0), (0, 1), (0, 0)))
  prev = jnp.pad(x_BxLxE[:, :-1], ((0, 0), (1, 0), (0, 0)))
  return jnp.concatenate([nxt, x_BxLxE, prev], axis=-1)


class Embeddings(nn.Module):
  """Word + position (+ token type) embeddings, LayerNorm, dropout, projection if factorized.

  With `project_word_embeddings` (MobileBERT) the projection maps the word vectors (or
  their trigrams) to hidden_size first; position and token-type tables are that wide.
  """

  cfg: EncoderConfig

  def setup(self):
    cfg = self.cfg
    pdtype = DTYPES[cfg.param_dtype]
    init = lambda axes: _dense_init(cfg, axes)  # noqa: E731
    self.word_embeddings = nn.Embed(cfg.vocab_size, cfg.embed_size, param_dtype=pdtype,
                                    dtype=DTYPES[cfg.dtype],
                                    embedding_init=init(("vocab", "embed")))
    width = cfg.hidden_size if cfg.project_word_embeddings else cfg.embed_size
    if cfg.position_embedding == "absolute":
      self.position_embeddings = nn.Embed(
          cfg.max_position_embeddings, width, param_dtype=pdtype,
          dtype=DTYPES[cfg.dtype], embedding_init=init((None, "embed")))
    if cfg.type_vocab_size > 0:
      self.token_type_embeddings = nn.Embed(
          cfg.type_vocab_size, width, param_dtype=pdtype, dtype=DTYPES[cfg.dtype],
          embedding_init=init((None, "embed")))
    if cfg.embedding_norm:
      self.layer_norm = _norm(cfg, eps=cfg.block_norm_eps)
    self.dropout = nn.Dropout(cfg.hidden_dropout)
    if cfg.embedding_projection:
      self.projection = nn.Dense(cfg.hidden_size, dtype=DTYPES[cfg.dtype], param_dtype=pdtype,
                                 kernel_init=init(("embed_proj", "embed")),
                                 bias_init=_zeros(("embed",)))

  def position_ids(self, attention_mask: Array) -> Array:
    cfg = self.cfg
    L = attention_mask.shape[-1]
    if cfg.position_offset == 0:
      return jnp.broadcast_to(jnp.arange(L), attention_mask.shape)
    # RoBERTa: real tokens count from the offset, padding sits at offset - 1.
    running = jnp.cumsum(attention_mask, axis=-1) - 1
    return jnp.where(attention_mask > 0, running + cfg.position_offset, cfg.position_offset - 1)

  def embed_positions(self, position_ids: Array) -> Array:
    return self.position_embeddings(position_ids)

  def __call__(self, input_ids, segment_ids, position_ids, *, deterministic: bool) -> Array:
    return self.project(self.embed(input_ids, segment_ids, position_ids,
                                   deterministic=deterministic))

  def embed(self, input_ids, segment_ids, position_ids, *, deterministic: bool) -> Array:
    """Tables + LayerNorm + dropout, before the projection: the part ELECTRA's generator
    shares with its discriminator (with project_word_embeddings, the projection included)."""
    return self.embed_vectors(self.word_embeddings(input_ids), segment_ids, position_ids,
                              deterministic=deterministic)

  def embed_vectors(self, vectors, segment_ids, position_ids, *, deterministic: bool) -> Array:
    """`embed` with the word vectors given ([.., embed_size]): e.g. a two-stream query
    stream that starts from a learned mask embedding plus its position's encodings."""
    cfg = self.cfg
    x = vectors.astype(DTYPES[cfg.dtype])
    if cfg.project_word_embeddings:
      if cfg.trigram_input:
        x = trigram(x)
      if cfg.embedding_projection:
        x = self.projection(x)
    if cfg.position_embedding == "absolute":
      x = x + self.position_embeddings(position_ids)
    if cfg.type_vocab_size > 0:
      x = x + self.token_type_embeddings(segment_ids)
    if cfg.embedding_norm:
      x = self.layer_norm(x)
    return self.dropout(x, deterministic=deterministic)

  def project(self, x: Array) -> Array:
    if self.cfg.embedding_projection and not self.cfg.project_word_embeddings:
      x = self.projection(x)
    return x

  def attend(self, x: Array) -> Array:
    """Tied output projection: x [.., E] -> logits over the vocabulary."""
    return self.word_embeddings.attend(x)


class Encoder(nn.Module):
  """Ids -> hidden states; optionally every layer's states, attention maps and a query stream.

  `inputs_embeds` ([B, L, embed_size], before the projection) replaces the embedding
  lookup, for towers that share another encoder's tables (ELECTRA's generator).

  Two-stream attention: `query_states` [B, Lq, H] (after the embedding projection) with
  `query_mask` ([B, Lq, L] or [B, L] keys it may see) run through every layer alongside the
  content stream, which then attends under `attention_mask` [B, L, L]; `query_positions`
  [B, Lq] are the positions the query rows stand for (needed with relative positions when
  Lq != L; default 0..L-1).

  Returns a dict with "hidden_states" [B, L, H], and on request "all_hidden_states" (the
  embedding output then each layer's output), "attentions" (each layer's [B, heads, L, L]
  probabilities) and "query_states" (the query stream's last layer, two-stream attention).
  """

  cfg: EncoderConfig

  def setup(self):
    cfg = self.cfg
    self.embeddings = Embeddings(cfg)
    layer_cls = Layer
    if cfg.remat != "none":
      layer_cls = nn.remat(Layer, policy=REMAT_POLICIES[cfg.remat], static_argnums=(3, 6))
    n_modules = cfg.num_layer_groups or cfg.num_layers
    self.layers = [layer_cls(cfg, cfg.layer_heads(i) if cfg.pruned_heads else None,
                             name=f"layer_{i}") for i in range(n_modules)]
    if cfg.pre_layer_norm:
      self.final_norm = _norm(cfg)
    if cfg.position_embedding == "relative":
      self.relative_dropout = nn.Dropout(cfg.hidden_dropout)

  def relative_inputs(self, segment_ids: Array, query_positions: Array | None,
                      query_len: int | None, *, deterministic: bool):
    """The relative-attention inputs of the content stream and of the query stream."""
    cfg = self.cfg
    L = segment_ids.shape[1]
    pos_emb = sinusoid_relative_encodings(L, L, cfg.hidden_size)
    pos_emb = self.relative_dropout(pos_emb.astype(DTYPES[cfg.dtype]),
                                    deterministic=deterministic)
    rel = {"pos_emb": pos_emb}
    if cfg.relative_segments:
      rel["seg_diff"] = segment_ids[:, :, None] != segment_ids[:, None, :]
    if query_len is None:
      return rel, None
    query_rel = {"pos_emb": pos_emb}
    q_seg = segment_ids
    if query_positions is not None:
      query_rel["q_pos"] = query_positions
      q_seg = jnp.take_along_axis(segment_ids, query_positions, axis=1)
    elif query_len != L:
      raise ValueError(f"a query stream of length {query_len} != {L} needs query_positions")
    if cfg.relative_segments:
      query_rel["seg_diff"] = q_seg[:, :, None] != segment_ids[:, None, :]
    return rel, query_rel

  def layer_module(self, i: int) -> nn.Module:
    """The module that runs layer i (ALBERT shares one per group of consecutive layers)."""
    per_group = self.cfg.num_layers // len(self.layers)
    return self.layers[i // per_group]

  def __call__(self, input_ids: Array, segment_ids: Array | None = None,
               attention_mask: Array | None = None, *, position_ids: Array | None = None,
               deterministic: bool = True, query_states: Array | None = None,
               query_mask: Array | None = None, query_positions: Array | None = None,
               output_hidden_states: bool = False, output_attentions: bool = False,
               inputs_embeds: Array | None = None,
               stop_gradient_layer: Array | int | None = None) -> dict[str, Any]:
    """Hidden states (and every layer's, and attention maps, on request).

    `stop_gradient_layer` (an int, possibly traced; -1 or None: none) cuts the gradient at
    that layer's input, so the embeddings and the layers below it are not trained
    (progressive layer-wise distillation trains one layer at a time).
    """
    cfg = self.cfg
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    padding = attention_mask if attention_mask.ndim == 2 else jnp.ones_like(input_ids)
    if segment_ids is None:
      segment_ids = jnp.zeros_like(input_ids)
    if position_ids is None:
      position_ids = self.embeddings.position_ids(padding)
    if inputs_embeds is None:
      x = self.embeddings(input_ids, segment_ids, position_ids, deterministic=deterministic)
    else:  # embeddings computed elsewhere (shared tables): only this tower's projection
      x = self.embeddings.project(inputs_embeds)
    x = nn.with_logical_constraint(x.astype(DTYPES[cfg.dtype]), ("batch", "length", "embed"))
    mask = _as_4d_mask(attention_mask)
    qmask = None if query_states is None else _as_4d_mask(query_mask)
    g = query_states
    rel = query_rel = None
    if cfg.position_embedding == "relative":
      rel, query_rel = self.relative_inputs(
          segment_ids, query_positions, None if g is None else g.shape[1],
          deterministic=deterministic)
    hidden, attentions = [x], []
    for i in range(cfg.num_layers):
      if stop_gradient_layer is not None:
        x = jnp.where(stop_gradient_layer == i, jax.lax.stop_gradient(x), x)
      x, g, probs = self.layer_module(i)(x, mask, deterministic, g, qmask, output_attentions,
                                         rel, query_rel)
      hidden.append(x)
      if output_attentions:
        attentions.append(probs)
    if cfg.pre_layer_norm:
      x = self.final_norm(x)
      g = None if g is None else self.final_norm(g)
      hidden[-1] = x
    out: dict[str, Any] = {"hidden_states": x}
    if output_hidden_states:
      out["all_hidden_states"] = tuple(hidden)
    if output_attentions:
      out["attentions"] = tuple(attentions)
    if g is not None:
      out["query_states"] = g
    return out

  def attend(self, x: Array) -> Array:
    """Logits over the vocabulary with the tied word-embedding matrix."""
    return self.embeddings.attend(x)

  def embed_tokens(self, ids: Array) -> Array:
    """Word embeddings alone (e.g. to seed a query stream)."""
    return self.embeddings.word_embeddings(ids)
