"""Training-step benchmark; the same as `python -m shufflemamba_jax.benchmark` (see BENCHMARKS.md).

python benchmarks/train_step.py --variant shufflemamba_tiny --img_size 224 --batch_size 8 --compare_slws
"""

from shufflemamba_jax import benchmark

if __name__ == "__main__":
  benchmark.main()
