"""models.detection.nms against a float64 transcription of torchvision's greedy NMS (torch_reference.nms,
batched_nms) and against hand-worked cases: the kept indices, in order, must be the same, for every tile
size (tiles that do not divide N included), with padding, ties, empty boxes and suppression chains."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflemamba_jax.models.detection import nms as nms_lib

torch = pytest.importorskip("torch")
torch_reference = pytest.importorskip("torch_reference")

_JITTED = {}


def _run(
  boxes,
  scores,
  threshold,
  max_output,
  *,
  labels=None,
  valid=None,
  tile_size=nms_lib.DEFAULT_TILE_SIZE,
  pre_nms_top_k=None,
):
  """The kept indices (numpy int) of nms / batched_nms, jitted once per static configuration and shape."""
  key = (labels is not None, valid is not None, max_output, tile_size, pre_nms_top_k)
  if key not in _JITTED:

    def fn(boxes, scores, threshold, labels, valid):
      kwargs = dict(valid=valid, tile_size=tile_size, pre_nms_top_k=pre_nms_top_k)
      if labels is None:
        return nms_lib.nms(boxes, scores, threshold, max_output, **kwargs)
      return nms_lib.batched_nms(boxes, scores, labels, threshold, max_output, **kwargs)

    _JITTED[key] = jax.jit(fn)
  indices, mask = _JITTED[key](
    jnp.asarray(boxes, jnp.float32), jnp.asarray(scores, jnp.float32), jnp.float32(threshold), labels, valid
  )
  indices, mask = np.asarray(indices), np.asarray(mask)
  assert indices.shape == mask.shape == (max_output,) and indices.dtype == np.int32
  count = int(mask.sum())
  # The mask is a prefix; -1 past it.
  assert mask[:count].all() and (indices[count:] == -1).all()
  return indices[:count]


def _oracle(boxes, scores, threshold, *, labels=None, valid=None):
  """torch_reference's kept indices (into the full input) over the valid boxes."""
  boxes64, scores64 = torch.tensor(np.asarray(boxes, np.float64)), torch.tensor(np.asarray(scores, np.float64))
  where = np.arange(len(scores)) if valid is None else np.flatnonzero(np.asarray(valid))
  select = torch.tensor(where, dtype=torch.int64)
  if labels is None:
    kept = torch_reference.nms(boxes64[select], scores64[select], threshold)
  else:
    kept = torch_reference.batched_nms(
      boxes64[select], scores64[select], torch.tensor(np.asarray(labels))[select], threshold
    )
  return where[kept.numpy()]


def _clustered_boxes(rng, n, clusters=6):
  """n float32 boxes in a 200 x 200 image, jittered copies of a few boxes by 2 to 40 % of their size:
  many overlaps, at every IoU."""
  base = np.concatenate([rng.uniform(20, 140, (clusters, 2)), rng.uniform(10, 60, (clusters, 2))], axis=1)
  base = base[rng.integers(0, clusters, n)]  # x1, y1, w, h
  jitter = rng.normal(0, 1, (n, 4)) * rng.uniform(0.02, 0.4, (n, 1)) * np.tile(base[:, 2:], 2)
  boxes = np.concatenate([base[:, :2], base[:, :2] + base[:, 2:]], axis=1) + jitter
  boxes = np.concatenate([np.minimum(boxes[:, :2], boxes[:, 2:]), np.maximum(boxes[:, :2], boxes[:, 2:])], axis=1)
  return np.clip(boxes, 0, 200).astype(np.float32)


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_overlapping_boxes(seed, threshold):
  """Clustered random boxes: every tile size (1, 7 and 64 do not divide 150) keeps the oracle's boxes."""
  rng = np.random.default_rng(seed)
  boxes, scores = _clustered_boxes(rng, 150), rng.uniform(0, 1, 150).astype(np.float32)
  expected = _oracle(boxes, scores, threshold)
  assert 5 < len(expected) < 140  # Overlaps suppressed some, not all.
  for tile_size in (1, 7, 64, 512):
    np.testing.assert_array_equal(_run(boxes, scores, threshold, 150, tile_size=tile_size), expected)


def test_ties_and_identical_boxes():
  """Scores on a coarse grid (many exact ties) and duplicated boxes: equal scores go lower index first,
  as the oracle's stable sort; an identical box (IoU 1) is always suppressed by its kept twin."""
  rng = np.random.default_rng(2)
  boxes = _clustered_boxes(rng, 60)
  boxes = np.concatenate([boxes, boxes[:20], boxes[:10]])  # 90 boxes, 30 duplicates
  scores = np.round(rng.uniform(0, 1, 90), 1).astype(np.float32)  # 11 values
  scores[60:80] = scores[:20]  # duplicates with the same score too
  for threshold in (0.5, 0.95):
    expected = _oracle(boxes, scores, threshold)
    for tile_size in (8, 90):
      np.testing.assert_array_equal(_run(boxes, scores, threshold, 90, tile_size=tile_size), expected)
  # Hand-worked: three equal boxes with equal scores keep the first one.
  box = np.array([[0, 0, 10, 10]] * 3, np.float32)
  np.testing.assert_array_equal(_run(box, np.ones(3), 0.5, 3, tile_size=2), [0])


def test_padding_is_never_kept_and_never_suppresses():
  """Invalid boxes with the highest scores, on top of valid ones: the result is NMS of the valid ones."""
  rng = np.random.default_rng(3)
  boxes, scores = _clustered_boxes(rng, 100), rng.uniform(0, 1, 100).astype(np.float32)
  valid = rng.uniform(size=100) < 0.6
  padding = np.flatnonzero(~valid)
  boxes[padding] = boxes[np.flatnonzero(valid)[: len(padding)]]  # twins of valid boxes (43 of 57)
  scores[~valid] = 2.0  # Would come first and suppress their valid twins if they counted.
  expected = _oracle(boxes, scores, 0.5, valid=valid)
  for tile_size in (16, 100):
    kept = _run(boxes, scores, 0.5, 100, valid=jnp.asarray(valid), tile_size=tile_size)
    np.testing.assert_array_equal(kept, expected)
  # All padding: nothing kept.
  assert len(_run(boxes, scores, 0.5, 100, valid=jnp.zeros(100, bool), tile_size=16)) == 0


def test_degenerate_boxes():
  """Zero-area boxes (0 / 0 IoU is no overlap, as torchvision's NaN > threshold is false) among normal ones."""
  boxes = np.array(
    [
      [5, 5, 5, 5],  # a point
      [5, 5, 5, 5],  # the same point: 0 / 0, kept
      [0, 0, 10, 0],  # a segment
      [0, 0, 10, 10],  # contains all of them, but inter 0: IoU 0
      [0, 0, 10, 10],  # its twin: suppressed
      [2, 2, 2, 8],  # a segment inside the square
    ],
    np.float32,
  )
  scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4], np.float32)
  np.testing.assert_array_equal(_oracle(boxes, scores, 0.0), [0, 1, 2, 3, 5])
  np.testing.assert_array_equal(_run(boxes, scores, 0.0, 6, tile_size=4), [0, 1, 2, 3, 5])
  rng = np.random.default_rng(4)
  many = _clustered_boxes(rng, 80)
  many[::3, 2] = many[::3, 0]  # every third box has zero width
  scores = rng.uniform(0, 1, 80).astype(np.float32)
  np.testing.assert_array_equal(_run(many, scores, 0.3, 80, tile_size=16), _oracle(many, scores, 0.3))


def test_exact_threshold_is_not_suppressed():
  """IoU > threshold, strictly: IoU exactly 0.5 survives threshold 0.5 and not 0.49."""
  boxes = np.array([[0, 0, 2, 1], [0, 0, 1, 1]], np.float32)  # inter 1, union 2
  np.testing.assert_array_equal(_run(boxes, [0.9, 0.8], 0.5, 2), [0, 1])
  np.testing.assert_array_equal(_run(boxes, [0.9, 0.8], 0.49, 2), [0])
  np.testing.assert_array_equal(_oracle(boxes, [0.9, 0.8], 0.5), [0, 1])


@pytest.mark.parametrize("tile_size", [1, 3, 4, 5, 32])
def test_chains(tile_size):
  """A suppresses B, which would suppress C, but B is gone: C stays. A row of 20 boxes, each overlapping
  only its neighbours (IoU 1/3 at threshold 0.3), by decreasing score keeps every other one, within tiles
  (the fixed point needs the whole chain) and across them. Scored in reverse, the last box leads."""
  row = np.array([[5 * k, 0, 5 * k + 10, 10] for k in range(20)], np.float32)
  scores = np.linspace(1, 0.05, 20).astype(np.float32)
  np.testing.assert_array_equal(_oracle(row, scores, 0.3), np.arange(0, 20, 2))
  np.testing.assert_array_equal(_run(row, scores, 0.3, 20, tile_size=tile_size), np.arange(0, 20, 2))
  np.testing.assert_array_equal(_run(row, scores[::-1], 0.3, 20, tile_size=tile_size), np.arange(19, 0, -2))
  # Interleaved scores: the chain is resolved out of input order.
  perm = np.random.default_rng(5).permutation(20)
  np.testing.assert_array_equal(_run(row, scores[perm], 0.3, 20, tile_size=tile_size), _oracle(row, scores[perm], 0.3))


def test_max_output():
  """The first max_output kept boxes when fewer fit; -1 padding and a False mask past the kept count."""
  rng = np.random.default_rng(6)
  boxes, scores = _clustered_boxes(rng, 120), rng.uniform(0, 1, 120).astype(np.float32)
  expected = _oracle(boxes, scores, 0.5)
  for max_output in (1, 10, len(expected), len(expected) + 1, 300):
    kept = _run(boxes, scores, 0.5, max_output, tile_size=16)
    np.testing.assert_array_equal(kept, expected[:max_output])


def test_nan_scores_come_first():
  """A NaN score sorts first, as in torch's descending sort, and suppresses like any kept box."""
  boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 9], [20, 20, 30, 30]], np.float32)
  scores = np.array([0.9, np.nan, 0.5], np.float32)
  np.testing.assert_array_equal(_oracle(boxes, scores, 0.5), [1, 2])
  np.testing.assert_array_equal(_run(boxes, scores, 0.5, 3, tile_size=2), [1, 2])


@pytest.mark.parametrize("tile_size", [16, 512])
def test_batched_nms(tile_size):
  """Several labels: boxes of one label never suppress another's; one sequence by decreasing score,
  as torchvision's coordinate trick (the oracle)."""
  rng = np.random.default_rng(7)
  boxes, scores = _clustered_boxes(rng, 160, clusters=3), rng.uniform(0, 1, 160).astype(np.float32)
  labels = rng.integers(0, 5, 160).astype(np.int32)
  valid = rng.uniform(size=160) < 0.9
  for threshold in (0.3, 0.6):
    expected = _oracle(boxes, scores, threshold, labels=labels, valid=valid)
    assert len(expected) > len(_oracle(boxes, scores, threshold, valid=valid))  # labels matter
    kept = _run(
      boxes, scores, threshold, 160, labels=jnp.asarray(labels), valid=jnp.asarray(valid), tile_size=tile_size
    )
    np.testing.assert_array_equal(kept, expected)
  # Hand-worked: twins of different labels are both kept; same label, one.
  twins = np.array([[0, 0, 10, 10]] * 3, np.float32)
  np.testing.assert_array_equal(_run(twins, [0.9, 0.8, 0.7], 0.5, 3, labels=jnp.array([1, 2, 1])), [0, 1])


def test_pre_nms_top_k():
  """Only the top k valid boxes enter: exact with at most k valid; past that, the full NMS's kept boxes
  among the top k (greedy decides a box from the higher-scored ones alone)."""
  rng = np.random.default_rng(8)
  boxes, scores = _clustered_boxes(rng, 200), rng.uniform(0, 1, 200).astype(np.float32)
  valid = np.zeros(200, bool)
  valid[rng.permutation(200)[:50]] = True
  expected = _oracle(boxes, scores, 0.5, valid=valid)
  kept = _run(boxes, scores, 0.5, 200, valid=jnp.asarray(valid), tile_size=16, pre_nms_top_k=64)
  np.testing.assert_array_equal(kept, expected)  # 50 valid <= 64

  full = _oracle(boxes, scores, 0.5)
  top = set(np.argsort(-scores, kind="stable")[:64].tolist())
  kept = _run(boxes, scores, 0.5, 200, tile_size=16, pre_nms_top_k=64)
  np.testing.assert_array_equal(kept, [i for i in full if i in top])
  assert len(kept) < len(full)
  # When max_output boxes come out of the top k, they are the full NMS's first max_output.
  kept = _run(boxes, scores, 0.5, 10, tile_size=16, pre_nms_top_k=64)
  np.testing.assert_array_equal(kept, full[:10])


def test_compiles_once_per_shape():
  """New values (boxes, scores, threshold, labels, padding) reuse the compiled program."""
  traces = []

  @jax.jit
  def fn(boxes, scores, labels, threshold, valid):
    traces.append(1)
    return nms_lib.batched_nms(boxes, scores, labels, threshold, 20, valid=valid, tile_size=8)

  rng = np.random.default_rng(9)
  for k in range(3):
    boxes, scores = _clustered_boxes(rng, 30), rng.uniform(0, 1, 30).astype(np.float32)
    labels, valid = rng.integers(0, 3, 30), rng.uniform(size=30) < 0.8
    indices, mask = fn(boxes, scores, jnp.asarray(labels), jnp.float32(0.3 + 0.2 * k), jnp.asarray(valid))
    expected = _oracle(boxes, scores, 0.3 + 0.2 * k, labels=labels, valid=valid)
    np.testing.assert_array_equal(np.asarray(indices)[np.asarray(mask)], expected[:20])
  assert len(traces) == 1


def test_vmap_over_images():
  """A batch of images, each with its own boxes, padding and threshold, under vmap (and jit)."""
  rng = np.random.default_rng(10)
  batch, n = 3, 70
  boxes = np.stack([_clustered_boxes(rng, n) for _ in range(batch)])
  scores = rng.uniform(0, 1, (batch, n)).astype(np.float32)
  valid = rng.uniform(size=(batch, n)) < 0.85
  valid[2] = False  # an image without boxes
  thresholds = np.array([0.3, 0.5, 0.7], np.float32)
  fn = jax.jit(jax.vmap(lambda b, s, t, v: nms_lib.nms(b, s, t, 40, valid=v, tile_size=16)))
  indices, mask = map(np.asarray, fn(boxes, scores, thresholds, valid))
  for i in range(batch):
    expected = _oracle(boxes[i], scores[i], float(thresholds[i]), valid=valid[i])[:40]
    np.testing.assert_array_equal(indices[i][mask[i]], expected)
  assert not mask[2].any() and (indices[2] == -1).all()


def test_bad_arguments():
  """Shapes and static arguments are checked, naming the argument."""
  boxes, scores = jnp.zeros((5, 4)), jnp.zeros(5)
  with pytest.raises(ValueError, match="boxes"):
    nms_lib.nms(jnp.zeros((5, 5)), scores, 0.5, 3)
  with pytest.raises(ValueError, match="scores"):
    nms_lib.nms(boxes, jnp.zeros(4), 0.5, 3)
  with pytest.raises(ValueError, match="valid"):
    nms_lib.nms(boxes, scores, 0.5, 3, valid=jnp.ones(5))
  with pytest.raises(ValueError, match="labels"):
    nms_lib.batched_nms(boxes, scores, jnp.zeros(4, jnp.int32), 0.5, 3)
  with pytest.raises(ValueError, match="max_output"):
    nms_lib.nms(boxes, scores, 0.5, 0)
  with pytest.raises(ValueError, match="pre_nms_top_k"):
    nms_lib.nms(boxes, scores, 0.5, 3, pre_nms_top_k=0)
  # No boxes at all: nothing kept.
  indices, mask = nms_lib.nms(jnp.zeros((0, 4)), jnp.zeros(0), 0.5, 4)
  assert indices.tolist() == [-1] * 4 and not mask.any()
