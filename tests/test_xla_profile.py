"""benchmarks/_xla_profile.py: FLOP counts and the per-instruction breakdown."""

from absl.testing import absltest
import jax
import jax.numpy as jnp

from benchmarks import _xla_profile


class XlaProfileTest(absltest.TestCase):

  def test_flops_of_a_matmul(self):
    a = jnp.ones((64, 32), jnp.float32)
    b = jnp.ones((32, 16), jnp.float32)
    self.assertEqual(_xla_profile.flops(jax.jit(jnp.matmul), a, b),
                     2 * 64 * 32 * 16)

  def test_breakdown_finds_the_matmul_and_the_concatenate(self):
    def fn(a, b):
      y = jnp.tanh(a @ b)
      return jnp.concatenate([y, 2.0 * y], axis=-1).sum()

    a = jnp.ones((256, 128), jnp.float32)
    b = jnp.ones((128, 256), jnp.float32)
    compiled = jax.jit(fn).lower(a, b).compile()
    jax.block_until_ready(compiled(a, b))
    result = _xla_profile.breakdown(
        compiled, lambda: jax.block_until_ready(compiled(a, b)), steps=2)
    self.assertIn('matmuls', result['categories'])
    self.assertGreater(result['categories']['matmuls'], 0.0)
    self.assertAlmostEqual(sum(result['categories'].values()),
                           result['total_ms'], places=6)
    self.assertNotEmpty(result['top'])

  def test_matmul_peak_is_positive(self):
    peak = _xla_profile.matmul_peak(size=128, rounds=3)
    self.assertGreater(peak['max_gflops'], 0.0)
    self.assertGreaterEqual(peak['max_gflops'], peak['median_gflops'])


if __name__ == '__main__':
  absltest.main()
