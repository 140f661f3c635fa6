"""The training-step benchmark in its CI smoke mode: a tiny model, 2 timed steps, JSON output."""

import contextlib
import io
import json
import math

import pytest

from shufflemamba_jax import benchmark
from shufflemamba_jax.models import vim

# Width 48, depth 4, 16x16 images with patch 4 (17 tokens), the default scan (chunked) and remat.
SMOKE = [
  "--variant",
  "shufflemamba_tiny",
  "--img_size",
  "16",
  "--patch_size",
  "4",
  "--embed_dim",
  "48",
  "--depth",
  "4",
  "--batch_size",
  "4",
  "--steps",
  "2",
  "--warmup",
  "1",
  "--peak_tflops",
  "1.0",
  "--json",
]


@pytest.fixture(scope="module")
def record():
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    returned = benchmark.main(SMOKE + ["--compare_slws"])
  record = json.loads(printed.getvalue().strip().splitlines()[-1])  # --json prints one object
  assert record == json.loads(json.dumps(returned))
  return record


@pytest.mark.parametrize(
  "key,kind",
  [
    ("compile_s", float),
    ("temp_bytes", int),
    ("argument_bytes", int),
    ("output_bytes", int),
    ("flops_xla", float),
    ("flops_analytic", int),
    ("step_time_median_s", float),
    ("images_per_s", float),
    ("mfu", float),
    ("slws_overhead_ratio", float),
    ("slws_pair_ratio_median", float),
  ],
)
def test_json_field_is_present_with_its_type(record, key, kind):
  assert key in record, f"missing JSON key {key}"
  assert isinstance(record[key], kind) and not isinstance(record[key], bool), (key, record[key])
  assert math.isfinite(record[key]) and record[key] > 0, (key, record[key])


def test_derived_fields_are_consistent(record):
  assert record["images_per_s"] == pytest.approx(4 / record["step_time_median_s"])
  assert record["mfu"] == pytest.approx(record["flops_analytic"] / record["step_time_median_s"] / 1e12)
  assert len(record["step_times_s"]) == len(record["step_times_s_p0"]) == 2
  assert record["slws_overhead_ratio"] == pytest.approx(record["step_time_median_s"] / record["step_time_median_s_p0"])
  assert record["slws_prob"] == 0.5 and record["sequence_length"] == 17
  # The state is held as arguments; donation lets the new state reuse the old one's buffers.
  assert record["argument_bytes"] >= record["alias_bytes"] > 0


def test_analytic_flops_count_the_matmuls_and_the_scan():
  """Hand count for width 48 (E 96, R 3, N 16), depth 4, 17 tokens of 16 patches, 1000 classes."""
  config = vim.VisionMambaConfig(img_size=16, patch_size=4, embed_dim=48, depth=4)
  L, D, E, R, N = 17, 48, 96, 3, 16
  direction = 2 * L * E * 4 + 2 * L * E * (R + 2 * N) + 2 * L * R * E + 7 * L * E * N + 7 * L * E
  layer = 2 * L * D * 2 * E + 2 * L * E * D + 2 * direction
  forward = 2 * 16 * 4 * 4 * 3 * D + 4 * layer + 2 * D * 1000
  assert benchmark.analytic_forward_flops(config, 16) == forward
  assert benchmark.analytic_train_flops(config, 16, batch_size=4) == 3 * 4 * forward


def test_markdown_row_has_one_cell_per_header_column(record):
  header_cells = benchmark.MARKDOWN_HEADER.splitlines()[0].count("|")
  row = benchmark.markdown_row(record)
  assert row.split(" SLWS")[0].count("|") == header_cells
  assert "SLWS overhead ratio" in row


def test_compare_slws_refuses_compile_only():
  with pytest.raises(ValueError, match="compare_slws"):
    benchmark.run(benchmark.Settings(), compile_only=True, compare_slws=True)
