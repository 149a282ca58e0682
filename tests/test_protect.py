"""Tests for metacf.protect against float64 NumPy closed forms.

Written from the module's contract, independently of its implementation:
every reference below (projections, Saha et al.'s GPM rule, A-GEM, the
softmax-regression Fisher, EWC) is recomputed here in NumPy float64.
"""

import functools
import re

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import optax

from metacf import protect

_RTOL = 1e-5
_ATOL = 1e-6


# ---------------------------------------------------------------------------
# NumPy helpers.
# ---------------------------------------------------------------------------


def _np_ravel(tree):
  """Flat float64 vector in ``jax.flatten_util.ravel_pytree`` order."""
  return np.concatenate(
      [np.ravel(np.asarray(leaf, np.float64))
       for leaf in jax.tree.leaves(tree)])


def _np_unravel(flat, like):
  leaves, treedef = jax.tree.flatten(like)
  out, start = [], 0
  for leaf in leaves:
    size = int(np.size(leaf))
    out.append(flat[start:start + size].reshape(np.shape(leaf)))
    start += size
  assert start == flat.size
  return jax.tree.unflatten(treedef, out)


def _orthonormal_rows(rng, k, p):
  q, _ = np.linalg.qr(rng.standard_normal((p, k)))
  return q.T  # [k, p]


def _row_projector(rows):
  rows = np.asarray(rows, np.float64)
  return rows.T @ rows


def _col_projector(cols):
  cols = np.asarray(cols, np.float64)
  return cols @ cols.T


def _span_projector(rows):
  """Projector onto the row space of any (possibly rank-deficient) matrix."""
  u, s, _ = np.linalg.svd(np.asarray(rows, np.float64).T, full_matrices=False)
  u = u[:, s > 1e-8 * s.max()]
  return u @ u.T


def _assert_orthonormal_rows(rows, atol=1e-5):
  rows = np.asarray(rows, np.float64)
  np.testing.assert_allclose(rows @ rows.T, np.eye(rows.shape[0]), atol=atol)


def _tree(seed, like, scale=1.0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: (scale * rng.standard_normal(np.shape(x))).astype(np.float32),
      like)


_SHAPES = {'a': np.zeros((3, 2)), 'b': np.zeros((4,)), 'c': np.zeros(())}
_NUM_PARAMS = 3 * 2 + 4 + 1


# ---------------------------------------------------------------------------
# orthogonal_projection.
# ---------------------------------------------------------------------------


class OrthogonalProjectionTest(chex.TestCase):

  def _setup(self, k=3):
    rng = np.random.default_rng(0)
    basis = _orthonormal_rows(rng, k, _NUM_PARAMS)
    grads = _tree(1, _SHAPES)
    return basis, grads

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(('k_1', 1), ('k_3', 3), ('k_full', 11))
  def test_matches_float64_reference(self, k):
    basis, grads = self._setup(k)
    tx = protect.orthogonal_projection(jnp.asarray(basis, jnp.float32))
    state = tx.init(grads)

    @self.variant
    def project(g, s):
      return tx.update(g, s)[0]

    got = project(grads, state)
    g = _np_ravel(grads)
    want = _np_unravel(g - basis.T @ (basis @ g), grads)
    chex.assert_trees_all_equal_shapes_and_dtypes(got, grads)
    chex.assert_trees_all_close(got, want, rtol=_RTOL, atol=_ATOL)

  def test_result_is_orthogonal_to_basis_and_idempotent(self):
    basis, grads = self._setup(4)
    tx = protect.orthogonal_projection(jnp.asarray(basis, jnp.float32))
    state = tx.init(grads)
    once, state = tx.update(grads, state)
    np.testing.assert_allclose(basis @ _np_ravel(once), 0.0, atol=_ATOL)
    twice, _ = tx.update(once, state)
    chex.assert_trees_all_close(twice, once, rtol=_RTOL, atol=_ATOL)

  def test_array_updates(self):
    rng = np.random.default_rng(2)
    basis = _orthonormal_rows(rng, 2, 7)
    g = rng.standard_normal(7).astype(np.float32)
    tx = protect.orthogonal_projection(jnp.asarray(basis, jnp.float32))
    got, _ = tx.update(g, tx.init(g))
    want = np.float64(g) - basis.T @ (basis @ np.float64(g))
    np.testing.assert_allclose(got, want, rtol=_RTOL, atol=_ATOL)

  def test_chains_with_sgd(self):
    basis, grads = self._setup(3)
    lr = 0.1
    tx = optax.chain(
        protect.orthogonal_projection(jnp.asarray(basis, jnp.float32)),
        optax.sgd(lr))
    params = _tree(5, _SHAPES)
    updates, _ = tx.update(grads, tx.init(params), params)
    g = _np_ravel(grads)
    want = _np_unravel(-lr * (g - basis.T @ (basis @ g)), grads)
    chex.assert_trees_all_close(updates, want, rtol=_RTOL, atol=_ATOL)

  def test_chains_with_momentum(self):
    # The optimizer after the projection only ever sees projected gradients.
    basis, _ = self._setup(3)
    proj = protect.orthogonal_projection(jnp.asarray(basis, jnp.float32))
    tx = optax.chain(proj, optax.sgd(1e-2, momentum=0.9))
    ref = optax.sgd(1e-2, momentum=0.9)
    params = _tree(5, _SHAPES)
    state, ref_state = tx.init(params), ref.init(params)
    for seed in range(2):
      grads = _tree(30 + seed, _SHAPES)
      got, state = tx.update(grads, state, params)
      projected, _ = proj.update(grads, proj.init(params))
      want, ref_state = ref.update(projected, ref_state, params)
      chex.assert_trees_all_close(got, want, rtol=_RTOL, atol=_ATOL)

  def test_projected_gd_leaves_task_a_predictions_unchanged(self):
    # f(theta, x) = x @ theta; V spans task A's input directions, so
    # GD on task B under the projection never moves x_A @ theta.
    rng = np.random.default_rng(3)
    dim = 8
    x_a = rng.standard_normal((3, dim))
    x_b = rng.standard_normal((6, dim))
    y_b = rng.standard_normal(6)
    q, _ = np.linalg.qr(x_a.T)
    basis = q.T  # [3, dim], orthonormal rows spanning the rows of x_a
    theta0 = rng.standard_normal(dim)

    def loss_b(theta):
      return jnp.mean((x_b @ theta - y_b)**2)

    with jax.enable_x64(True):
      for protected in (True, False):
        parts = [optax.sgd(0.05)]
        if protected:
          parts.insert(0, protect.orthogonal_projection(jnp.asarray(basis)))
        tx = optax.chain(*parts)
        theta = jnp.asarray(theta0)
        state = tx.init(theta)
        for _ in range(30):
          updates, state = tx.update(jax.grad(loss_b)(theta), state, theta)
          theta = optax.apply_updates(theta, updates)
        self.assertEqual(theta.dtype, jnp.float64)
        self.assertLess(float(loss_b(theta)), 0.9 * float(loss_b(theta0)))
        drift = np.max(np.abs(x_a @ np.asarray(theta) - x_a @ theta0))
        if protected:
          self.assertLess(drift, 1e-12)
        else:
          self.assertGreater(drift, 1e-2)  # the projection is what protects

  def test_jitted_step_compiles_once(self):
    basis, _ = self._setup(3)
    tx = optax.chain(
        protect.orthogonal_projection(jnp.asarray(basis, jnp.float32)),
        optax.sgd(0.1))
    params = jax.tree.map(jnp.asarray, _tree(5, _SHAPES))
    state = tx.init(params)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, state, grads):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    for seed in range(3):
      params, state = step(params, state, _tree(10 + seed, _SHAPES))
    chex.assert_tree_all_finite(params)
    self.assertEqual(step._cache_size(), 1)

  def test_bad_inputs(self):
    basis, grads = self._setup(3)

    def run(b, g=grads):
      tx = protect.orthogonal_projection(b)
      tx.update(g, tx.init(g))

    with self.assertRaisesRegex(ValueError, r'orthogonal_projection: basis'):
      run(jnp.asarray(basis[0], jnp.float32))  # 1-D
    with self.assertRaisesRegex(ValueError, r'orthogonal_projection: basis'):
      run(jnp.zeros((2, 3, _NUM_PARAMS)))  # 3-D
    with self.assertRaisesRegex(ValueError, r'orthogonal_projection: basis'):
      run(jnp.asarray(basis[:, :-1], jnp.float32))  # width P - 1
    with self.assertRaisesRegex(ValueError,
                                r'orthogonal_projection: basis.*orthonormal'):
      run(jnp.asarray(2.0 * basis, jnp.float32))
    with self.assertRaisesRegex(ValueError,
                                r'orthogonal_projection: basis.*orthonormal'):
      run(jnp.asarray(np.stack([basis[0], basis[0]]), jnp.float32))


# ---------------------------------------------------------------------------
# extend_basis.
# ---------------------------------------------------------------------------


class ExtendBasisTest(chex.TestCase):

  def test_none_basis(self):
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((3, 9)).astype(np.float32)
    got = np.asarray(protect.extend_basis(None, vectors))
    self.assertEqual(got.shape, (3, 9))
    _assert_orthonormal_rows(got)
    np.testing.assert_allclose(_row_projector(got), _span_projector(vectors),
                               atol=1e-5)

  def test_old_rows_first_and_span_of_both(self):
    rng = np.random.default_rng(1)
    basis = _orthonormal_rows(rng, 2, 9).astype(np.float32)
    vectors = rng.standard_normal((3, 9)).astype(np.float32)
    got = np.asarray(protect.extend_basis(jnp.asarray(basis), vectors))
    self.assertEqual(got.shape, (5, 9))
    _assert_orthonormal_rows(got)
    np.testing.assert_allclose(got[:2], basis, atol=1e-6)
    np.testing.assert_allclose(
        _row_projector(got),
        _span_projector(np.concatenate([basis, vectors])), atol=1e-5)

  def test_vector_in_span_is_dropped(self):
    rng = np.random.default_rng(2)
    basis = _orthonormal_rows(rng, 2, 9).astype(np.float32)
    new = rng.standard_normal(9).astype(np.float32)
    in_span = (0.6 * basis[0] - 0.8 * basis[1]).astype(np.float32)
    got = np.asarray(
        protect.extend_basis(basis, np.stack([in_span, new, 3.0 * in_span])))
    self.assertEqual(got.shape, (3, 9))
    _assert_orthonormal_rows(got)
    np.testing.assert_allclose(got[:2], basis, atol=1e-6)
    np.testing.assert_allclose(
        _row_projector(got),
        _span_projector(np.concatenate([basis, new[None]])), atol=1e-5)

  def test_duplicate_within_vectors_is_dropped(self):
    rng = np.random.default_rng(3)
    v = rng.standard_normal(9).astype(np.float32)
    w = rng.standard_normal(9).astype(np.float32)
    got = np.asarray(protect.extend_basis(None, np.stack([v, -2.0 * v, w])))
    self.assertEqual(got.shape, (2, 9))
    _assert_orthonormal_rows(got)
    np.testing.assert_allclose(_row_projector(got),
                               _span_projector(np.stack([v, w])), atol=1e-5)

  def test_zero_vector_is_dropped(self):
    rng = np.random.default_rng(4)
    basis = _orthonormal_rows(rng, 2, 9).astype(np.float32)
    v = rng.standard_normal(9).astype(np.float32)
    got = np.asarray(
        protect.extend_basis(basis, np.stack([np.zeros(9, np.float32), v])))
    self.assertEqual(got.shape, (3, 9))
    chex.assert_tree_all_finite(got)
    _assert_orthonormal_rows(got)
    # Only zero vectors: nothing to add, the basis comes back.
    same = np.asarray(protect.extend_basis(basis, np.zeros((2, 9), np.float32)))
    np.testing.assert_allclose(same, basis, atol=1e-6)

  def test_tol_is_relative_to_vector_norm(self):
    rng = np.random.default_rng(5)
    basis = _orthonormal_rows(rng, 2, 9)
    orth = rng.standard_normal(9)
    orth -= basis.T @ (basis @ orth)
    orth /= np.linalg.norm(orth)
    # Residual norm / vector norm = 1e-3, at a large overall scale.
    v = 1e3 * (basis[0] + 1e-3 * orth)
    v = v.astype(np.float32)
    basis = basis.astype(np.float32)
    kept = np.asarray(protect.extend_basis(basis, v[None]))
    self.assertEqual(kept.shape, (3, 9))
    _assert_orthonormal_rows(kept, atol=1e-4)
    np.testing.assert_allclose(np.abs(kept[2] @ orth), 1.0, atol=1e-3)
    dropped = np.asarray(protect.extend_basis(basis, v[None], tol=1e-2))
    self.assertEqual(dropped.shape, (2, 9))

  def test_full_space_stops_at_width(self):
    rng = np.random.default_rng(6)
    basis = _orthonormal_rows(rng, 3, 5).astype(np.float32)
    vectors = rng.standard_normal((4, 5)).astype(np.float32)
    got = np.asarray(protect.extend_basis(basis, vectors))
    self.assertEqual(got.shape, (5, 5))
    _assert_orthonormal_rows(got)
    np.testing.assert_allclose(got[:3], basis, atol=1e-6)

  def test_grown_basis_feeds_orthogonal_projection(self):
    rng = np.random.default_rng(7)
    g1 = rng.standard_normal(_NUM_PARAMS).astype(np.float32)
    g2 = rng.standard_normal(_NUM_PARAMS).astype(np.float32)
    basis = protect.extend_basis(None, g1[None])
    basis = protect.extend_basis(basis, g2[None])
    tx = protect.orthogonal_projection(jnp.asarray(basis))
    g = _tree(8, _SHAPES)
    out, _ = tx.update(g, tx.init(g))
    np.testing.assert_allclose(np.stack([g1, g2]) @ _np_ravel(out), 0.0,
                               atol=1e-4)


# ---------------------------------------------------------------------------
# gpm_basis.
# ---------------------------------------------------------------------------


def _np_gpm(representation, threshold, basis=None):
  """Saha et al. 2021's rule in float64, written from the paper's recipe."""
  r = np.asarray(representation, np.float64)
  if basis is None:
    u, s, _ = np.linalg.svd(r, full_matrices=False)
    k = int(np.sum(np.cumsum(s**2) / np.sum(s**2) < threshold))
    return u[:, :k]
  m = np.asarray(basis, np.float64)
  r_hat = r - m @ (m.T @ r)
  u_hat, s_hat, _ = np.linalg.svd(r_hat, full_matrices=False)
  total = np.sum(r**2)
  acc = total - np.sum(r_hat**2)
  # Saha et al.'s loop: add the next residual direction while the share
  # captured so far (basis plus directions already added) is below it.
  k = 0
  while k < len(s_hat) and (acc + np.sum(s_hat[:k]**2)) / total < threshold:
    k += 1
  out = np.concatenate([m, u_hat[:, :k]], axis=1)
  return out[:, :r.shape[0]]


def _np_gpm_ratios(representation, basis=None):
  """The energy ratios the rule compares with the threshold."""
  r = np.asarray(representation, np.float64)
  if basis is None:
    s = np.linalg.svd(r, compute_uv=False)
    return np.cumsum(s**2) / np.sum(s**2)
  m = np.asarray(basis, np.float64)
  r_hat = r - m @ (m.T @ r)
  s_hat = np.linalg.svd(r_hat, compute_uv=False)
  total = np.sum(r**2)
  before = np.concatenate([[0.], np.cumsum(s_hat**2)[:-1]])
  return (total - np.sum(r_hat**2) + before) / total


_D = 16
_N = 40


def _gpm_tasks():
  """Two low-rank-plus-noise representations [d, n] sharing directions.

  The signal spectra decay geometrically, so consecutive singular values
  are well separated and the kept subspaces are well conditioned.
  """
  rng = np.random.default_rng(0)
  q, _ = np.linalg.qr(rng.standard_normal((_D, _D)))
  def task(cols, scales):
    v, _ = np.linalg.qr(rng.standard_normal((_N, len(cols))))
    noise = 1e-3 * rng.standard_normal((_D, _N))
    return q[:, cols] @ np.diag(scales) @ v.T + noise
  r1 = task(list(range(0, 7)), 10.0 * 0.7**np.arange(7))
  r2 = task(list(range(2, 10)), 8.0 * 0.72**np.arange(8))
  return r1, r2


def _assert_orthonormal_cols(cols, atol=1e-5):
  _assert_orthonormal_rows(np.asarray(cols).T, atol=atol)


class GpmBasisTest(chex.TestCase):

  @parameterized.named_parameters(('th_0.9', 0.9), ('th_0.95', 0.95),
                                  ('th_0.99', 0.99))
  def test_two_tasks_match_float64_reference(self, threshold):
    r1, r2 = _gpm_tasks()
    # The fixture keeps every energy ratio away from the threshold, so
    # float32 and float64 count the same number of directions.
    ref1 = _np_gpm(r1, threshold)
    ref2 = _np_gpm(r2, threshold, ref1)
    self.assertGreater(np.min(np.abs(_np_gpm_ratios(r1) - threshold)), 5e-4)
    self.assertGreater(
        np.min(np.abs(_np_gpm_ratios(r2, ref1) - threshold)), 5e-4)
    self.assertGreater(ref1.shape[1], 0)
    self.assertGreater(ref2.shape[1], ref1.shape[1])  # task 2 adds some

    got1 = np.asarray(protect.gpm_basis(jnp.asarray(r1, jnp.float32),
                                        threshold))
    self.assertEqual(got1.shape, ref1.shape)
    _assert_orthonormal_cols(got1)
    np.testing.assert_allclose(_col_projector(got1), _col_projector(ref1),
                               atol=1e-4)

    got2 = np.asarray(protect.gpm_basis(jnp.asarray(r2, jnp.float32),
                                        threshold, jnp.asarray(got1)))
    self.assertEqual(got2.shape, ref2.shape)
    _assert_orthonormal_cols(got2)
    np.testing.assert_allclose(got2[:, :got1.shape[1]], got1, atol=1e-6)
    np.testing.assert_allclose(_col_projector(got2), _col_projector(ref2),
                               atol=1e-4)

  def test_hand_computed_counts(self):
    # Singular values squared 0.5, 0.3, 0.2 (total energy 1).
    r = np.diag(np.sqrt([0.5, 0.3, 0.2])).astype(np.float32)
    eye = np.eye(3)
    # First task: cumulative shares 0.5, 0.8, 1.0; strictly below 0.75: one.
    first = np.asarray(protect.gpm_basis(r, 0.75))
    self.assertEqual(first.shape, (3, 1))
    np.testing.assert_allclose(_col_projector(first),
                               _col_projector(eye[:, :1]), atol=1e-6)
    # Second task with M = e0: acc = 0.5 < 0.75 adds e1; the share is then
    # 0.8, not below 0.75, so e2 is not added (Saha et al., Eq. 9) ...
    m = eye[:, :1].astype(np.float32)
    got = np.asarray(protect.gpm_basis(r, 0.75, m))
    self.assertEqual(got.shape, (3, 2))
    np.testing.assert_allclose(_col_projector(got),
                               _col_projector(eye[:, :2]), atol=1e-6)
    # ... while at 0.85, 0.8 < 0.85 also adds e2.
    got = np.asarray(protect.gpm_basis(r, 0.85, m))
    self.assertEqual(got.shape, (3, 3))
    # And with a basis that already holds 0.8 >= 0.75, nothing is added.
    got = np.asarray(protect.gpm_basis(r, 0.75, eye[:, :2].astype(np.float32)))
    self.assertEqual(got.shape, (3, 2))

  def test_float64_reference_counts(self):
    # The rule's counts on the fixture, by hand: strictly-below entries.
    r1, _ = _gpm_tasks()
    ratios = _np_gpm_ratios(r1)
    for threshold in (0.9, 0.95, 0.99):
      want = int(np.sum(ratios < threshold))
      got = protect.gpm_basis(jnp.asarray(r1, jnp.float32), threshold)
      self.assertEqual(np.shape(got), (_D, want))

  def test_float64_inputs_are_tight(self):
    r1, r2 = _gpm_tasks()
    with jax.enable_x64(True):
      got1 = np.asarray(protect.gpm_basis(jnp.asarray(r1), 0.97))
      got2 = np.asarray(protect.gpm_basis(jnp.asarray(r2), 0.97, got1))
    ref1 = _np_gpm(r1, 0.97)
    ref2 = _np_gpm(r2, 0.97, ref1)
    self.assertEqual(got2.shape, ref2.shape)
    np.testing.assert_allclose(_col_projector(got1), _col_projector(ref1),
                               atol=1e-10)
    np.testing.assert_allclose(_col_projector(got2), _col_projector(ref2),
                               atol=1e-10)

  def test_representation_in_span_adds_nothing(self):
    r1, _ = _gpm_tasks()
    m = np.asarray(protect.gpm_basis(jnp.asarray(r1, jnp.float32), 0.95))
    coeffs = np.random.default_rng(1).standard_normal((m.shape[1], _N))
    r_in = (m @ coeffs).astype(np.float32)
    got = np.asarray(protect.gpm_basis(r_in, 0.95, m))
    self.assertEqual(got.shape, m.shape)
    np.testing.assert_allclose(got, m, atol=1e-6)

  def test_at_most_d_columns(self):
    rng = np.random.default_rng(2)
    d = 5
    r1 = rng.standard_normal((d, 30)).astype(np.float32)
    r2 = rng.standard_normal((d, 30)).astype(np.float32)
    m = protect.gpm_basis(r1, 0.999)
    self.assertLessEqual(np.shape(m)[1], d)
    got = np.asarray(protect.gpm_basis(r2, 0.999, m))
    self.assertLessEqual(got.shape[1], d)
    self.assertEqual(got.shape[0], d)
    chex.assert_tree_all_finite(got)
    _assert_orthonormal_cols(got)

  @parameterized.named_parameters(('zero', 0.0), ('one', 1.0), ('big', 1.5),
                                  ('negative', -0.1), ('nan', float('nan')))
  def test_bad_threshold(self, threshold):
    r1, _ = _gpm_tasks()
    with self.assertRaisesRegex(ValueError,
                                r'gpm_basis: threshold must be .*in \(0, 1\)'):
      protect.gpm_basis(jnp.asarray(r1, jnp.float32), threshold)

  def test_bad_shapes(self):
    r1, _ = _gpm_tasks()
    r1 = jnp.asarray(r1, jnp.float32)
    with self.assertRaisesRegex(ValueError, r'gpm_basis: representation'):
      protect.gpm_basis(r1[0], 0.9)
    with self.assertRaisesRegex(ValueError, r'gpm_basis: representation'):
      protect.gpm_basis(r1[None], 0.9)
    m = protect.gpm_basis(r1, 0.9)
    with self.assertRaisesRegex(ValueError, r'gpm_basis: basis'):
      protect.gpm_basis(r1[:-1], 0.9, m)

  def test_non_orthonormal_basis_is_rejected(self):
    # The example: ones((4, 2)) used to come back, extended, as a
    # "basis" whose columns are neither unit nor orthogonal.
    r = np.random.default_rng(3).standard_normal((4, 10)).astype(np.float32)
    number = r'[0-9.e+-]+'
    message = ('gpm_basis: basis must have orthonormal columns (M^T M = I; '
               'zero columns allowed), got max |(M^T M)^2 q - M^T M q| / '
               'max |q| = NUMBER for a random q (tolerance 0.001); '
               'orthonormalise it, e.g. with jnp.linalg.qr(basis)[0].')
    pattern = '^' + re.escape(message).replace('NUMBER', number) + '$'
    with self.assertRaisesRegex(ValueError, pattern):
      protect.gpm_basis(r, 0.9, basis=jnp.ones((4, 2)))
    scaled = 2.0 * protect.gpm_basis(r, 0.9)  # orthogonal, not unit
    with self.assertRaisesRegex(ValueError, pattern):
      protect.gpm_basis(r, 0.9, basis=scaled)
    with self.assertRaisesRegex(
        ValueError, r'^gpm_basis: basis must be finite, got NaN or inf\.$'):
      protect.gpm_basis(r, 0.9, basis=jnp.full((4, 1), jnp.nan))
    with self.assertRaisesRegex(
        TypeError, r'^gpm_basis: basis must be floating, got dtype int32\.$'):
      protect.gpm_basis(r, 0.9, basis=np.eye(4, 2, dtype=np.int32))
    # An orthonormal basis (with a zero column) still passes.
    padded = np.zeros((4, 3), np.float32)
    padded[:, :1] = protect.gpm_basis(r, 0.9)[:, :1]
    protect.gpm_basis(r, 0.9, basis=padded)


# ---------------------------------------------------------------------------
# gpm_projection.
# ---------------------------------------------------------------------------


def _gpm_params():
  return {
      'dense1': {'kernel': np.zeros((5, 4), np.float32),
                 'bias': np.zeros((4,), np.float32)},
      'conv': {'kernel': np.zeros((3, 3, 2, 6), np.float32),
               'bias': np.zeros((6,), np.float32)},
  }


def _gpm_bases():
  rng = np.random.default_rng(0)
  return {
      'dense1': {'kernel': _orthonormal_rows(rng, 2, 5).T.astype(np.float32),
                 'bias': None},
      'conv': {'kernel': _orthonormal_rows(rng, 7, 18).T.astype(np.float32),
               'bias': None},
  }


def _np_gpm_project(grads, bases):
  def one(g, m):
    g = np.asarray(g, np.float64)
    if m is None:
      return g
    m = np.asarray(m, np.float64)
    g2 = g.reshape(-1, g.shape[-1])
    return (g2 - m @ (m.T @ g2)).reshape(g.shape)
  return jax.tree.map(one, grads, bases, is_leaf=lambda x: x is None)


class GpmProjectionTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_float64_reference(self):
    bases = _gpm_bases()
    grads = _tree(1, _gpm_params())
    tx = protect.gpm_projection(bases)
    state = tx.init(grads)

    @self.variant
    def project(g, s):
      return tx.update(g, s)[0]

    got = project(grads, state)
    chex.assert_trees_all_equal_shapes_and_dtypes(got, grads)
    chex.assert_trees_all_close(got, _np_gpm_project(grads, bases),
                                rtol=_RTOL, atol=_ATOL)
    # Unprojected leaves pass through untouched.
    np.testing.assert_array_equal(got['dense1']['bias'],
                                  grads['dense1']['bias'])
    np.testing.assert_array_equal(got['conv']['bias'], grads['conv']['bias'])

  def test_layer_outputs_on_protected_inputs_unchanged(self):
    # Inputs in span(M) see no change in x @ W after a projected SGD step.
    bases = _gpm_bases()
    params = _tree(2, _gpm_params())
    grads = _tree(3, _gpm_params())
    tx = optax.chain(protect.gpm_projection(bases), optax.sgd(0.5))
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    rng = np.random.default_rng(4)
    for name in ('dense1', 'conv'):
      m = np.float64(bases[name]['kernel'])
      x = rng.standard_normal((6, m.shape[1])) @ m.T  # [6, d_in] in span(M)
      w_old = np.float64(params[name]['kernel']).reshape(m.shape[0], -1)
      w_new = np.float64(new[name]['kernel']).reshape(m.shape[0], -1)
      np.testing.assert_allclose(x @ w_new, x @ w_old, atol=1e-5)
      self.assertGreater(np.max(np.abs(w_new - w_old)), 1e-2)

  def test_all_none_is_identity(self):
    params = _gpm_params()
    bases = jax.tree.map(lambda _: None, params)
    grads = _tree(5, params)
    tx = protect.gpm_projection(bases)
    got, _ = tx.update(grads, tx.init(grads))
    chex.assert_trees_all_close(got, grads)

  def test_chains_with_sgd_and_compiles_once(self):
    bases = _gpm_bases()
    params = _tree(6, _gpm_params())
    lr = 0.1
    tx = optax.chain(protect.gpm_projection(bases), optax.sgd(lr))
    state = tx.init(params)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, state, grads):
      updates, state = tx.update(grads, state, params)
      return updates, state

    for seed in range(3):
      grads = _tree(20 + seed, _gpm_params())
      updates, state = step(params, state, grads)
      want = jax.tree.map(lambda g: -lr * g, _np_gpm_project(grads, bases))
      chex.assert_trees_all_close(updates, want, rtol=_RTOL, atol=_ATOL)
    self.assertEqual(step._cache_size(), 1)

  def test_bad_d_in(self):
    bases = _gpm_bases()
    bases['conv']['kernel'] = bases['conv']['kernel'][:-1]  # [17, 7]
    grads = _tree(7, _gpm_params())
    with self.assertRaisesRegex(ValueError, r'gpm_projection: bases'):
      tx = protect.gpm_projection(bases)
      tx.update(grads, tx.init(grads))


class GpmProjectorTest(chex.TestCase):
  """``gpm_projector`` and ``gpm_projection(..., projectors=True)``."""

  def _projectors(self):
    return jax.tree.map(
        lambda m: None if m is None else protect.gpm_projector(m),
        _gpm_bases(), is_leaf=lambda x: x is None)

  def test_projector_is_m_m_transpose(self):
    m = np.float64(_gpm_bases()['conv']['kernel'])
    padded = np.concatenate([m, np.zeros((m.shape[0], 3))], axis=1)
    with jax.enable_x64():
      np.testing.assert_allclose(protect.gpm_projector(jnp.asarray(padded)),
                                 m @ m.T, rtol=1e-12, atol=1e-14)

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_float64_reference(self):
    grads = _tree(1, _gpm_params())
    tx = protect.gpm_projection(self._projectors(), projectors=True)

    @self.variant
    def project(g, s):
      return tx.update(g, s)[0]

    got = project(grads, tx.init(grads))
    chex.assert_trees_all_equal_shapes_and_dtypes(got, grads)
    chex.assert_trees_all_close(got, _np_gpm_project(grads, _gpm_bases()),
                                rtol=_RTOL, atol=_ATOL)
    np.testing.assert_array_equal(got['conv']['bias'], grads['conv']['bias'])

  def test_swapped_projectors_compile_once(self):
    params = _tree(6, _gpm_params())
    tx = optax.chain(protect.gpm_projection(self._projectors(),
                                            projectors=True), optax.sgd(0.1))
    step = jax.jit(lambda p, s, g: tx.update(g, s, p))
    state = tx.init(params)
    for seed in range(3):
      bases = jax.tree.map(
          lambda m: None if m is None else np.linalg.qr(
              np.random.default_rng(seed).standard_normal(m.shape))[0
                                                                    ].astype(
                  np.float32), _gpm_bases(), is_leaf=lambda x: x is None)
      state = optax.tree.set(state, bases=jax.tree.map(
          lambda m: None if m is None else protect.gpm_projector(m), bases,
          is_leaf=lambda x: x is None))
      grads = _tree(30 + seed, _gpm_params())
      updates, state = step(params, state, grads)
      want = jax.tree.map(lambda g: -0.1 * g, _np_gpm_project(grads, bases))
      chex.assert_trees_all_close(updates, want, rtol=_RTOL, atol=_ATOL)
    self.assertEqual(step._cache_size(), 1)

  def test_bad_projectors(self):
    m = _gpm_bases()['dense1']['kernel']
    bases = {**self._projectors(), 'dense1': {'kernel': m, 'bias': None}}
    with self.assertRaisesRegex(
        ValueError, r"gpm_projection: bases\['dense1'\]\['kernel'\] must be "
        r'a square \[d_in, d_in\] projection matrix \(projectors=True\), '
        r'got shape \(\d+, \d+\)\.'):
      protect.gpm_projection(bases, projectors=True)
    not_projector = 2.0 * protect.gpm_projector(m)
    bases = {**self._projectors(), 'dense1': {'kernel': not_projector,
                                              'bias': None}}
    with self.assertRaisesRegex(
        ValueError, r"gpm_projection: bases\['dense1'\]\['kernel'\] must be "
        r'a symmetric idempotent matrix M M\^T \(gpm_projector\)'):
      protect.gpm_projection(bases, projectors=True)
    with self.assertRaisesRegex(ValueError, r'gpm_projector: basis must have '
                                r'orthonormal columns'):
      protect.gpm_projector(2.0 * m)


# ---------------------------------------------------------------------------
# agem_project and agem.
# ---------------------------------------------------------------------------


def _np_agem(g, r):
  gf, rf = _np_ravel(g), _np_ravel(r)
  coef = min(gf @ rf, 0.0) / (rf @ rf)
  return _np_unravel(gf - coef * rf, g)


def _agem_pair(negative):
  g = _tree(0, _SHAPES)
  r = _tree(1, _SHAPES)
  dot = _np_ravel(g) @ _np_ravel(r)
  if (dot < 0) != negative:
    r = jax.tree.map(lambda x: -x, r)
  return g, r


class AgemProjectTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(('conflict', True), ('agree', False))
  def test_matches_float64_reference(self, negative):
    g, r = _agem_pair(negative)
    got = self.variant(protect.agem_project)(g, r)
    chex.assert_trees_all_equal_shapes_and_dtypes(got, g)
    chex.assert_trees_all_close(got, _np_agem(g, r), rtol=_RTOL, atol=_ATOL)

  def test_agreeing_gradient_is_unchanged(self):
    g, r = _agem_pair(negative=False)
    got = protect.agem_project(g, r)
    chex.assert_trees_all_close(got, g, rtol=1e-7, atol=0)
    # g . r == 0 exactly: on the boundary, also unchanged.
    g0 = {'a': np.array([1.0, 0.0], np.float32)}
    r0 = {'a': np.array([0.0, 3.0], np.float32)}
    chex.assert_trees_all_close(protect.agem_project(g0, r0), g0, atol=0)

  def test_conflicting_gradient_becomes_orthogonal(self):
    g, r = _agem_pair(negative=True)
    got = protect.agem_project(g, r)
    rf = _np_ravel(r)
    scale = np.linalg.norm(_np_ravel(g)) * np.linalg.norm(rf)
    self.assertLess(abs(_np_ravel(got) @ rf), 1e-6 * scale)
    # Only the component along r changed.
    diff = _np_ravel(got) - _np_ravel(g)
    np.testing.assert_allclose(
        diff - rf * (diff @ rf) / (rf @ rf), 0.0, atol=1e-6)

  def test_dot_is_over_all_leaves(self):
    # Each leaf alone agrees or conflicts differently than the whole tree.
    g = {'x': np.array([1.0, 0.0], np.float32),
         'y': np.array([1.0], np.float32)}
    r = {'x': np.array([1.0, 0.0], np.float32),
         'y': np.array([-3.0], np.float32)}
    got = protect.agem_project(g, r)
    # g . r = 1 - 3 = -2, r . r = 10: g + 0.2 r.
    chex.assert_trees_all_close(
        got, {'x': np.array([1.2, 0.0]), 'y': np.array([0.4])}, rtol=_RTOL)

  def test_structure_mismatch(self):
    g, r = _agem_pair(negative=True)
    with self.assertRaisesRegex((ValueError, TypeError),
                                r'agem_project: reference_grads'):
      protect.agem_project(g, {'a': r['a'], 'b': r['b']})
    with self.assertRaisesRegex((ValueError, TypeError),
                                r'agem_project: reference_grads'):
      protect.agem_project(g, {**r, 'b': np.zeros((5,), np.float32)})


class AgemTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(('conflict', True), ('agree', False))
  def test_chain_equals_sgd_on_agem_project(self, negative):
    g, r = _agem_pair(negative)
    params = _tree(3, _SHAPES)
    lr = 0.1
    tx = optax.chain(protect.agem(), optax.sgd(lr))
    state = tx.init(params)

    @self.variant
    def step(g, state, params, r):
      return tx.update(g, state, params, reference_grads=r)

    updates, _ = step(g, state, params, r)
    want = jax.tree.map(lambda x: -lr * x, _np_agem(g, r))
    chex.assert_trees_all_close(updates, want, rtol=_RTOL, atol=_ATOL)

  def test_missing_reference_grads(self):
    g, _ = _agem_pair(negative=True)
    tx = protect.agem()
    with self.assertRaisesRegex(ValueError, r'reference_grads'):
      tx.update(g, tx.init(g), g)


# ---------------------------------------------------------------------------
# fisher_diagonal.
# ---------------------------------------------------------------------------

_N_EX, _D_IN, _C = 10, 3, 4


def _add_bias(z, b):
  # Works on one example [C] or a batch [..., C] under rank promotion 'raise'.
  return z + jnp.reshape(b, (1,) * (jnp.ndim(z) - 1) + jnp.shape(b))


def _softmax_regression(params, x):
  return _add_bias(x @ params['w'], params['b'])


def _softmax_problem(seed=0, scale=1.0):
  rng = np.random.default_rng(seed)
  params = {'w': (scale * rng.standard_normal((_D_IN, _C))).astype(np.float32),
            'b': (scale * rng.standard_normal(_C)).astype(np.float32)}
  x = rng.standard_normal((_N_EX, _D_IN)).astype(np.float32)
  labels = rng.integers(0, _C, _N_EX).astype(np.int32)
  return params, x, labels


def _np_softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def _np_softmax_regression_fisher(params, x, labels=None):
  x = np.float64(x)
  p = _np_softmax(x @ np.float64(params['w']) + np.float64(params['b']))
  if labels is None:
    v = p * (1 - p)                                # [N, C]
  else:
    v = (np.eye(_C)[labels] - p)**2
  return {'w': np.einsum('ni,nj->ij', x**2, v) / len(x), 'b': v.mean(0)}


def _mlp_apply(params, x):
  h = jnp.tanh(_add_bias(x @ params['l1']['w'], params['l1']['b']))
  return _add_bias(h @ params['l2']['w'], params['l2']['b'])


def _mlp_params(seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *s: rng.standard_normal(s).astype(np.float32)
  return {'l1': {'w': f(_D_IN, 5), 'b': 0.1 * f(5)},
          'l2': {'w': f(5, _C), 'b': 0.1 * f(_C)}}


def _loop_fisher(apply_fn, params, x, labels=None):
  """Per-example, per-class jax.grad loop (float64)."""
  with jax.enable_x64(True):
    params = jax.tree.map(np.float64, params)
    x = np.float64(x)
    total = jax.tree.map(np.zeros_like, params)
    logp = lambda p, xn, c: jax.nn.log_softmax(apply_fn(p, xn))[c]
    grad_logp = jax.jit(jax.grad(logp))
    for n in range(len(x)):
      probs = np.exp(np.asarray(jax.nn.log_softmax(apply_fn(params, x[n]))))
      classes = range(_C) if labels is None else [int(labels[n])]
      for c in classes:
        weight = probs[c] if labels is None else 1.0
        grad = grad_logp(params, x[n], c)
        total = jax.tree.map(lambda t, gr: t + weight * np.asarray(gr)**2,
                             total, grad)
    return jax.tree.map(lambda t: t / len(x), total)


class FisherDiagonalTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(('true', False), ('empirical', True))
  def test_softmax_regression_closed_form(self, empirical):
    params, x, labels = _softmax_problem()
    labels = labels if empirical else None

    @self.variant
    def fisher(params, x, labels):
      return protect.fisher_diagonal(_softmax_regression, params, x,
                                     labels=labels)

    got = fisher(params, x, labels)
    chex.assert_trees_all_equal_shapes_and_dtypes(got, params)
    chex.assert_trees_all_close(
        got, _np_softmax_regression_fisher(params, x, labels),
        rtol=_RTOL, atol=1e-7)

  @parameterized.named_parameters(('true', False), ('empirical', True))
  def test_mlp_matches_per_example_loop(self, empirical):
    params = _mlp_params()
    _, x, labels = _softmax_problem(1)
    labels = labels if empirical else None
    got = jax.jit(lambda p, x, y: protect.fisher_diagonal(
        _mlp_apply, p, x, labels=y))(params, x, labels)
    chex.assert_trees_all_equal_shapes_and_dtypes(got, params)
    chex.assert_trees_all_close(got,
                                _loop_fisher(_mlp_apply, params, x, labels),
                                rtol=1e-4, atol=1e-7)

  @parameterized.named_parameters(('true', False), ('empirical', True))
  def test_chunked_equals_unchunked(self, empirical):
    params = _mlp_params(2)
    _, x, labels = _softmax_problem(2)
    labels = labels if empirical else None
    whole = protect.fisher_diagonal(_mlp_apply, params, x, labels=labels)
    for chunk_size in (3, 4):
      chunked = jax.jit(lambda p, x, y, cs=chunk_size: protect.fisher_diagonal(
          _mlp_apply, p, x, labels=y, chunk_size=cs))(params, x, labels)
      chex.assert_trees_all_close(chunked, whole, rtol=1e-5, atol=1e-8)

  def test_saturated_logits_are_finite(self):
    params, x, labels = _softmax_problem(3, scale=1e3)
    for y in (None, labels):
      got = protect.fisher_diagonal(_softmax_regression, params, x, labels=y)
      chex.assert_tree_all_finite(got)
      self.assertTrue(all(np.all(np.asarray(v) >= 0)
                          for v in jax.tree.leaves(got)))

  def test_true_fisher_bias_is_bounded_by_a_quarter(self):
    # p (1 - p) <= 1/4 for each class.
    params, x, _ = _softmax_problem(4)
    got = protect.fisher_diagonal(_softmax_regression, params, x)
    self.assertTrue(np.all(np.asarray(got['b']) <= 0.25 + 1e-7))


# ---------------------------------------------------------------------------
# ewc_penalty and online_ewc_update.
# ---------------------------------------------------------------------------


def _ewc_trees(seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  like = {'w': np.zeros((3, 2)), 'b': np.zeros((2,))}
  f = lambda s, pos=False: (np.abs(rng.standard_normal(s)) if pos
                            else rng.standard_normal(s)).astype(dtype)
  params = jax.tree.map(lambda x: f(x.shape), like)
  anchor = jax.tree.map(lambda x: f(x.shape), like)
  fisher = jax.tree.map(lambda x: f(x.shape, pos=True), like)
  return params, anchor, fisher


def _np_ewc(params, anchor, fisher, strength):
  th, an, fi = _np_ravel(params), _np_ravel(anchor), _np_ravel(fisher)
  return strength / 2 * np.sum(fi * (th - an)**2)


class EwcPenaltyTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(('s_1', 1.0), ('s_100', 100.0))
  def test_matches_float64_reference(self, strength):
    params, anchor, fisher = _ewc_trees()
    got = self.variant(protect.ewc_penalty)(params, anchor, fisher, strength)
    self.assertEqual(np.shape(got), ())
    np.testing.assert_allclose(got, _np_ewc(params, anchor, fisher, strength),
                               rtol=_RTOL)

  def test_gradient(self):
    params, anchor, fisher = _ewc_trees()
    strength = 3.0
    grad = jax.grad(protect.ewc_penalty)(params, anchor, fisher, strength)
    want = jax.tree.map(
        lambda t, a, f: strength * np.float64(f) * (np.float64(t) - a),
        params, anchor, fisher)
    chex.assert_trees_all_close(grad, want, rtol=_RTOL, atol=_ATOL)
    # Zero at the anchor.
    at_anchor = jax.grad(protect.ewc_penalty)(anchor, anchor, fisher, strength)
    chex.assert_trees_all_close(at_anchor,
                                jax.tree.map(np.zeros_like, anchor), atol=0)

  def test_check_grads(self):
    params, anchor, fisher = _ewc_trees(1, np.float64)
    with jax.enable_x64(True):
      check_grads(jax.jit(
          lambda p: protect.ewc_penalty(p, anchor, fisher, 2.5)),
                  (params,), order=1, modes=('rev',))

  def test_traced_strength_compiles_once(self):
    params, anchor, fisher = _ewc_trees()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def penalty(params, strength):
      return protect.ewc_penalty(params, anchor, fisher, strength)

    for strength in (0.5, 2.0, 7.0):
      np.testing.assert_allclose(
          penalty(params, jnp.float32(strength)),
          _np_ewc(params, anchor, fisher, strength), rtol=_RTOL)
    self.assertEqual(penalty._cache_size(), 1)

  def test_structure_mismatch(self):
    params, anchor, fisher = _ewc_trees()
    errors = (ValueError, TypeError)
    with self.assertRaisesRegex(errors, r'ewc_penalty: anchor'):
      protect.ewc_penalty(params, {'w': anchor['w']}, fisher, 1.0)
    with self.assertRaisesRegex(errors, r'ewc_penalty: anchor'):
      protect.ewc_penalty(params, {**anchor, 'b': np.zeros(3, np.float32)},
                          fisher, 1.0)
    with self.assertRaisesRegex(errors, r'ewc_penalty: fisher'):
      protect.ewc_penalty(params, anchor, {'w': fisher['w']}, 1.0)
    with self.assertRaisesRegex(errors, r'ewc_penalty: fisher'):
      protect.ewc_penalty(params, anchor,
                          {**fisher, 'w': np.zeros((2, 3), np.float32)}, 1.0)


class OnlineEwcUpdateTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(('g_0', 0.0), ('g_0.9', 0.9), ('g_1', 1.0))
  def test_matches_reference(self, gamma):
    _, fisher, new_fisher = _ewc_trees(2)
    fisher = jax.tree.map(np.abs, fisher)
    got = self.variant(protect.online_ewc_update)(fisher, new_fisher, gamma)
    want = jax.tree.map(lambda f, n: gamma * np.float64(f) + n, fisher,
                        new_fisher)
    chex.assert_trees_all_equal_shapes_and_dtypes(got, fisher)
    chex.assert_trees_all_close(got, want, rtol=_RTOL, atol=1e-7)

  def test_running_sum_over_tasks(self):
    fishers = [_ewc_trees(s)[2] for s in range(3)]
    gamma = 0.5
    running = fishers[0]
    for f in fishers[1:]:
      running = protect.online_ewc_update(running, f, gamma)
    want = jax.tree.map(
        lambda a, b, c: 0.25 * np.float64(a) + 0.5 * np.float64(b) + c,
        *fishers)
    chex.assert_trees_all_close(running, want, rtol=_RTOL)


# ---------------------------------------------------------------------------
# ewc (the transformation).
# ---------------------------------------------------------------------------


class EwcTransformationTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_chain_with_sgd_is_gd_on_penalised_loss(self):
    params, anchor, fisher = _ewc_trees(3)
    grads = _ewc_trees(4)[0]  # A stand-in for the new task's gradient.
    strength, lr = 4.0, 0.1
    tx = optax.chain(protect.ewc(anchor, fisher, strength), optax.sgd(lr))
    state = tx.init(params)

    @self.variant
    def step(grads, state, params):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates)

    got = step(grads, state, params)
    penalty_grad = jax.grad(protect.ewc_penalty)(params, anchor, fisher,
                                                 strength)
    want = jax.tree.map(
        lambda p, g, q: np.float64(p) - lr * (np.float64(g) + q),
        params, grads, penalty_grad)
    chex.assert_trees_all_close(got, want, rtol=_RTOL, atol=_ATOL)
    chex.assert_trees_all_equal_shapes_and_dtypes(got, params)

  def test_zero_strength_and_anchor_leave_updates(self):
    params, anchor, fisher = _ewc_trees(5)
    grads = _ewc_trees(6)[0]
    for tx, p in ((protect.ewc(anchor, fisher, 0.0), params),
                  (protect.ewc(anchor, fisher, 3.0), anchor)):
      updates, _ = tx.update(grads, tx.init(p), p)
      chex.assert_trees_all_close(updates, grads, atol=0)

  def test_step_compiles_once(self):
    params, anchor, fisher = _ewc_trees(7)
    tx = protect.ewc(anchor, fisher, 2.0)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(grads, params):
      updates, _ = tx.update(grads, tx.init(params), params)
      return updates

    for seed in range(3):
      step(_ewc_trees(10 + seed)[0], params)
    self.assertEqual(step._cache_size(), 1)

  def test_bad_inputs(self):
    params, anchor, fisher = _ewc_trees(8)
    errors = (ValueError, TypeError)
    with self.assertRaisesRegex(errors, r'ewc: fisher'):
      protect.ewc(anchor, {'w': fisher['w']}, 1.0)
    with self.assertRaisesRegex(ValueError, r'ewc: strength must be >= 0, got -1.0'):
      protect.ewc(anchor, fisher, -1.0)
    tx = protect.ewc(anchor, fisher, 1.0)
    with self.assertRaisesRegex(ValueError, r'ewc: update needs params'):
      tx.update(params, tx.init(params))
    with self.assertRaisesRegex(errors, r'ewc: anchor'):
      tx.init({'w': params['w']})


class ZeroRowsTest(chex.TestCase):
  """Zero rows pad a growing basis to a fixed shape and project nothing."""

  def test_zero_rows_project_like_the_unpadded_basis(self):
    rng = np.random.default_rng(11)
    basis = _orthonormal_rows(rng, 3, _NUM_PARAMS).astype(np.float32)
    padded = np.concatenate([basis, np.zeros((4, _NUM_PARAMS), np.float32)])
    g = _tree(12, _SHAPES)
    unpadded = protect.orthogonal_projection(basis)
    want, _ = unpadded.update(g, unpadded.init(g))
    tx = protect.orthogonal_projection(padded)
    got, _ = tx.update(g, tx.init(g))
    chex.assert_trees_all_close(got, want, rtol=_RTOL, atol=_ATOL)

  def test_scaled_rows_still_rejected(self):
    rng = np.random.default_rng(13)
    basis = _orthonormal_rows(rng, 3, _NUM_PARAMS).astype(np.float32)
    basis[1] *= 2.0
    with self.assertRaisesRegex(ValueError,
                                r'orthogonal_projection: basis must have '
                                r'orthonormal rows'):
      protect.orthogonal_projection(basis)


# ---------------------------------------------------------------------------
# Arrays live in the optax state (issue 24, item 2).
# ---------------------------------------------------------------------------


def _user_step(tx):
  """A user's own jitted SGD step, the optimizer state an argument.

  Returns the step and the list it appends to each time it is traced
  (``chex.assert_max_traces`` counts per code object, so it would count
  this helper's traces across tests).
  """
  traces = []

  @jax.jit
  def step(params, opt_state, grads):
    traces.append(None)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return step, traces


def _lowered_bytes(tx, params):
  """Size of the StableHLO text of :func:`_user_step` for ``tx``."""
  state = tx.init(params)

  def step(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return len(jax.jit(step).lower(params, state, params).as_text().encode())


def _one_hot_rows(k, p, offset=0):
  """``[k, P]`` orthonormal rows with distinct entries (no splat constant)."""
  rows = np.zeros((k, p), np.float32)
  rows[np.arange(k), (np.arange(k) * 7 + offset) % p] = 1.0
  return rows


class OrthogonalProjectionStateTest(chex.TestCase):

  def test_init_puts_the_basis_in_the_state(self):
    basis = _orthonormal_rows(np.random.default_rng(0), 3, _NUM_PARAMS)
    basis = basis.astype(np.float32)
    tx = optax.chain(protect.orthogonal_projection(basis), optax.sgd(0.1))
    state = tx.init(_tree(1, _SHAPES))
    self.assertIsInstance(state[0], protect.OrthogonalProjectionState)
    self.assertEqual(protect.OrthogonalProjectionState._fields, ('basis',))
    np.testing.assert_array_equal(optax.tree.get(state, 'basis'), basis)

  @chex.variants(with_jit=True, without_jit=True)
  def test_update_reads_the_swapped_basis(self):
    rng = np.random.default_rng(1)
    first = _orthonormal_rows(rng, 3, _NUM_PARAMS).astype(np.float32)
    second = _orthonormal_rows(rng, 3, _NUM_PARAMS)
    lr = 0.1
    tx = optax.chain(protect.orthogonal_projection(first), optax.sgd(lr))
    params, grads = _tree(2, _SHAPES), _tree(3, _SHAPES)
    state = optax.tree.set(tx.init(params),
                           basis=jnp.asarray(second, jnp.float32))

    @self.variant
    def update(grads, state, params):
      return tx.update(grads, state, params)

    got, new_state = update(grads, state, params)
    g = _np_ravel(grads)
    want = _np_unravel(-lr * (g - second.T @ (second @ g)), grads)
    chex.assert_trees_all_close(got, want, rtol=_RTOL, atol=_ATOL)
    np.testing.assert_array_equal(new_state[0].basis,
                                  np.float32(second))  # Passed through.

  def test_user_step_compiles_once_across_tasks(self):
    # Ten tasks' bases, each k = 3 rows padded to k_max = 6 (zero rows
    # project nothing), swapped with optax.tree.set: one trace, one compile.
    rng = np.random.default_rng(4)
    lr = 0.05
    padded = np.zeros((6, _NUM_PARAMS), np.float32)
    tx = optax.chain(protect.orthogonal_projection(padded), optax.sgd(lr))
    params = jax.tree.map(jnp.asarray, _tree(5, _SHAPES))
    opt_state = tx.init(params)
    step, traces = _user_step(tx)
    for task in range(10):
      basis = _orthonormal_rows(rng, 3, _NUM_PARAMS)
      padded = np.zeros((6, _NUM_PARAMS), np.float32)
      padded[:3] = basis
      opt_state = optax.tree.set(opt_state, basis=jnp.asarray(padded))
      grads = _tree(40 + task, _SHAPES)
      before = _np_ravel(params)
      params, opt_state = step(params, opt_state, grads)
      g = _np_ravel(grads)
      np.testing.assert_allclose(
          _np_ravel(params), before - lr * (g - basis.T @ (basis @ g)),
          rtol=_RTOL, atol=_ATOL)
    self.assertEqual(step._cache_size(), 1)
    self.assertLen(traces, 1)

  def test_donated_state_leaves_the_callers_basis(self):
    # init copies the basis, so donating the state (the recommended step,
    # no copy of the basis per call) never consumes the caller's array.
    basis = jnp.asarray(_orthonormal_rows(np.random.default_rng(12), 3,
                                          _NUM_PARAMS), jnp.float32)
    lr = 0.1
    tx = optax.chain(protect.orthogonal_projection(basis), optax.sgd(lr))

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, grads):
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    params = jax.tree.map(jnp.asarray, _tree(13, _SHAPES))
    for _ in range(2):  # A second init after a donated step works too.
      opt_state = tx.init(params)
      grads = _tree(14, _SHAPES)
      before = _np_ravel(params)
      params, opt_state = step(params, opt_state, grads)
      v, g = np.float64(basis), _np_ravel(grads)
      np.testing.assert_allclose(_np_ravel(params),
                                 before - lr * (g - v.T @ (v @ g)),
                                 rtol=_RTOL, atol=_ATOL)
    self.assertFalse(basis.is_deleted())
    self.assertEqual(step._cache_size(), 1)

  def test_lowered_program_does_not_grow_with_num_params(self):
    k = 4
    sizes = {}
    for p in (10_000, 100_000):
      params = {'w': jnp.zeros((p // 10, 10), jnp.float32)}
      tx = optax.chain(protect.orthogonal_projection(_one_hot_rows(k, p)),
                       optax.sgd(0.1))
      sizes[p] = _lowered_bytes(tx, params)
    self.assertLess(sizes[100_000], 20_000)
    self.assertLess(abs(sizes[100_000] - sizes[10_000]), 100)
    # What the state avoids: the same basis closed over is a constant of the
    # program, at least its 4 k P bytes.
    basis = jnp.asarray(_one_hot_rows(k, 10_000))
    baked = jax.jit(lambda g: g - basis.T @ (basis @ g)).lower(
        jnp.zeros((10_000,), jnp.float32)).as_text()
    self.assertGreater(len(baked), 4 * k * 10_000)

  def test_shape_errors(self):
    params = _tree(6, _SHAPES)
    basis = _orthonormal_rows(np.random.default_rng(7), 2, _NUM_PARAMS)
    tx = protect.orthogonal_projection(basis.astype(np.float32))
    with self.assertRaisesRegex(ValueError, re.escape(
        'orthogonal_projection: basis must have shape [k, P] with P = 10, '
        'the number of parameters in the params, got shape (2, 11).')):
      tx.init({'a': params['a'], 'b': params['b']})
    state = optax.tree.set(tx.init(params),
                           basis=jnp.zeros((2, _NUM_PARAMS - 1)))
    with self.assertRaisesRegex(ValueError, re.escape(
        'orthogonal_projection: basis must have shape [k, P] with P = 11, '
        'the number of parameters in the updates, got shape (2, 10).')):
      jax.jit(tx.update)(params, state)  # Raised at trace time.
    with self.assertRaisesRegex(ValueError, re.escape(
        'orthogonal_projection: state must be the OrthogonalProjectionState '
        'that init returns, got EmptyState.')):
      tx.update(params, optax.EmptyState())


def _gpm_one_hot_bases(d_in, r, offset=0):
  cols = np.zeros((d_in, r), np.float32)
  cols[(np.arange(r) * 3 + offset) % d_in, np.arange(r)] = 1.0
  return {'dense': {'kernel': cols, 'bias': None}}


class GpmProjectionStateTest(chex.TestCase):

  def test_init_puts_the_bases_in_the_state(self):
    bases = _gpm_bases()
    tx = optax.chain(protect.gpm_projection(bases), optax.sgd(0.1))
    state = tx.init(_tree(1, _gpm_params()))
    self.assertIsInstance(state[0], protect.GpmProjectionState)
    self.assertEqual(protect.GpmProjectionState._fields, ('bases',))
    got = optax.tree.get(state, 'bases')
    self.assertIsNone(got['dense1']['bias'])
    chex.assert_trees_all_equal(got, bases)

  def test_user_step_compiles_once_across_tasks(self):
    # optax.tree.set replaces the whole bases tree, None leaves included.
    lr = 0.1
    rng = np.random.default_rng(8)
    tx = optax.chain(protect.gpm_projection(_gpm_bases()), optax.sgd(lr))
    params = jax.tree.map(jnp.asarray, _tree(9, _gpm_params()))
    opt_state = tx.init(params)
    step, traces = _user_step(tx)
    for task in range(4):
      bases = {'dense1': {'kernel': _orthonormal_rows(rng, 2, 5).T.astype(
                   np.float32), 'bias': None},
               'conv': {'kernel': _orthonormal_rows(rng, 7, 18).T.astype(
                   np.float32), 'bias': None}}
      opt_state = optax.tree.set(opt_state, bases=bases)
      grads = _tree(50 + task, _gpm_params())
      before = params
      params, opt_state = step(params, opt_state, grads)
      want = jax.tree.map(lambda p, g: np.float64(p) - lr * g, before,
                          _np_gpm_project(grads, bases))
      chex.assert_trees_all_close(params, want, rtol=_RTOL, atol=_ATOL)
    self.assertEqual(step._cache_size(), 1)
    self.assertLen(traces, 1)

  def test_lowered_program_does_not_grow_with_d_in(self):
    sizes = {}
    for d_in in (1_000, 10_000):
      params = {'dense': {'kernel': jnp.zeros((d_in, 16), jnp.float32),
                          'bias': jnp.zeros((16,), jnp.float32)}}
      tx = optax.chain(protect.gpm_projection(_gpm_one_hot_bases(d_in, 32)),
                       optax.sgd(0.1))
      sizes[d_in] = _lowered_bytes(tx, params)
    self.assertLess(sizes[10_000], 20_000)
    self.assertLess(abs(sizes[10_000] - sizes[1_000]), 100)

  def test_shape_and_orthonormality_errors(self):
    params = _tree(10, _gpm_params())
    tx = protect.gpm_projection(_gpm_bases())
    bad = _gpm_bases()
    bad['conv']['kernel'] = bad['conv']['kernel'][:-1]  # [17, 7]
    state = optax.tree.set(tx.init(params), bases=bad)
    with self.assertRaisesRegex(ValueError, re.escape(
        "gpm_projection: bases['conv']['kernel'] must have shape [d_in, r] "
        'with d_in = prod(kernel.shape[:-1]) rows for the kernel of shape '
        '(3, 3, 2, 6), got shape (17, 7).')):
      jax.jit(tx.update)(params, state)  # Raised at trace time.
    scaled = _gpm_bases()
    scaled['dense1']['kernel'] = 2.0 * scaled['dense1']['kernel']
    with self.assertRaisesRegex(
        ValueError, r"^gpm_projection: bases\['dense1'\]\['kernel'\] must "
        r'have orthonormal columns \(M\^T M = I; zero columns allowed\)'):
      protect.gpm_projection(scaled)


class EwcStateTest(chex.TestCase):

  def test_init_puts_the_arrays_in_the_state(self):
    params, anchor, fisher = _ewc_trees(20)
    tx = optax.chain(protect.ewc(anchor, fisher, 3.0), optax.sgd(0.1))
    state = tx.init(params)
    self.assertIsInstance(state[0], protect.EwcState)
    self.assertEqual(protect.EwcState._fields,
                     ('anchor', 'fisher', 'strength'))
    chex.assert_trees_all_equal(optax.tree.get(state, 'anchor'), anchor)
    chex.assert_trees_all_equal(optax.tree.get(state, 'fisher'), fisher)
    self.assertEqual(float(optax.tree.get(state, 'strength')), 3.0)

  def test_user_step_compiles_once_across_tasks(self):
    # anchor, fisher (params-like trees) and strength swapped by name.
    lr = 0.1
    params, anchor, fisher = _ewc_trees(21)
    tx = optax.chain(protect.ewc(anchor, fisher, 2.0), optax.sgd(lr))
    params = jax.tree.map(jnp.asarray, params)
    opt_state = tx.init(params)
    step, traces = _user_step(tx)
    for task in range(4):
      _, anchor, fisher = _ewc_trees(30 + task)
      strength = 1.0 + task
      opt_state = optax.tree.set(opt_state, anchor=anchor, fisher=fisher,
                                 strength=strength)
      grads = _ewc_trees(40 + task)[0]
      before = params
      params, opt_state = step(params, opt_state, grads)
      want = jax.tree.map(
          lambda p, g, a, f: np.float64(p) - lr * (
              np.float64(g) + strength * np.float64(f) *
              (np.float64(p) - np.float64(a))),
          before, grads, anchor, fisher)
      chex.assert_trees_all_close(params, want, rtol=_RTOL, atol=_ATOL)
    self.assertEqual(step._cache_size(), 1)
    self.assertLen(traces, 1)

  def test_params_as_anchor_and_donated_state(self):
    # ewc(params, ...) then a step donating params and state: the state
    # holds copies, so neither donation consumes the other's buffers.
    params, _, fisher = _ewc_trees(26)
    params = jax.tree.map(jnp.asarray, params)
    anchor = jax.tree.map(jnp.copy, params)
    tx = optax.chain(protect.ewc(params, fisher, 2.0), optax.sgd(0.1))
    opt_state = tx.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, grads):
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    grads = _ewc_trees(27)[0]
    params, opt_state = step(params, opt_state, grads)
    # At the anchor the penalty gradient is 0: plain SGD on grads.
    chex.assert_trees_all_close(
        params, jax.tree.map(lambda a, g: np.float64(a) - 0.1 * g, anchor,
                             grads), rtol=_RTOL, atol=_ATOL)
    chex.assert_trees_all_equal(opt_state[0].anchor, anchor)

  def test_filtering_swaps_one_of_several_penalties(self):
    # Offline EWC: one ewc per task; filtering on the chain index picks one.
    params, anchor0, fisher0 = _ewc_trees(22)
    _, anchor1, fisher1 = _ewc_trees(23)
    tx = optax.chain(protect.ewc(anchor0, fisher0, 1.0),
                     protect.ewc(anchor1, fisher1, 1.0), optax.sgd(0.1))
    state = tx.init(params)
    new_anchor = _ewc_trees(24)[1]
    state = optax.tree.set(state, lambda path, _: path[0].idx == 1,
                           anchor=new_anchor)
    chex.assert_trees_all_equal(state[0].anchor, anchor0)
    chex.assert_trees_all_equal(state[1].anchor, new_anchor)

  def test_lowered_program_does_not_grow_with_num_params(self):
    sizes = {}
    for p in (10_000, 100_000):
      rng = np.random.default_rng(p)
      params = {'w': jnp.zeros((p,), jnp.float32)}
      anchor = {'w': rng.standard_normal(p).astype(np.float32)}
      fisher = {'w': np.abs(rng.standard_normal(p)).astype(np.float32)}
      tx = optax.chain(protect.ewc(anchor, fisher, 2.0), optax.sgd(0.1))
      sizes[p] = _lowered_bytes(tx, params)
    self.assertLess(sizes[100_000], 20_000)
    self.assertLess(abs(sizes[100_000] - sizes[10_000]), 100)

  def test_shape_errors(self):
    params, anchor, fisher = _ewc_trees(25)
    tx = protect.ewc(anchor, fisher, 1.0)
    state = optax.tree.set(tx.init(params),
                           fisher={'w': np.zeros((3, 3), np.float32),
                                   'b': fisher['b']})
    with self.assertRaisesRegex(ValueError, re.escape(
        "ewc: fisher must have the shapes of params, got (3, 3) for "
        "params['w'] of shape (3, 2).")):
      jax.jit(tx.update)(params, state, params)  # Raised at trace time.
    with self.assertRaisesRegex(ValueError, re.escape(
        'ewc: strength must be a scalar, got shape (2,).')):
      protect.ewc(anchor, fisher, np.ones((2,), np.float32))


class AgemStateTest(chex.TestCase):

  def test_user_step_compiles_once_across_reference_grads(self):
    lr = 0.1
    tx = optax.chain(protect.agem(), optax.sgd(lr))
    params = jax.tree.map(jnp.asarray, _tree(60, _SHAPES))
    opt_state = tx.init(params)
    self.assertIsInstance(opt_state[0], protect.AgemState)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, opt_state, grads, reference):
      updates, opt_state = tx.update(grads, opt_state, params,
                                     reference_grads=reference)
      return optax.apply_updates(params, updates), opt_state

    for seed in range(3):
      g, r = _agem_pair(negative=seed % 2 == 0)
      before = params
      params, opt_state = step(params, opt_state, g, r)
      want = jax.tree.map(lambda p, u: np.float64(p) - lr * u, before,
                          _np_agem(g, r))
      chex.assert_trees_all_close(params, want, rtol=_RTOL, atol=_ATOL)
    self.assertEqual(step._cache_size(), 1)


class TreeSetFilteringTest(chex.TestCase):

  def test_params_key_named_like_a_field(self):
    # optax.tree.set matches dict keys too: a params key 'fisher' inside
    # the anchor would be replaced; filtering on NamedTupleKey avoids it.
    params = {'fisher': np.zeros((2,), np.float32),
              'w': np.zeros((3,), np.float32)}
    ones = jax.tree.map(np.ones_like, params)
    tx = optax.chain(protect.ewc(params, ones, 1.0), optax.sgd(0.1))
    state = tx.init(params)
    new = jax.tree.map(lambda x: np.full_like(x, 5.0), params)
    clobbered = optax.tree.set(state, fisher=new)
    self.assertIsInstance(clobbered[0].anchor['fisher'], dict)
    with self.assertRaisesRegex(ValueError, r'^ewc: anchor'):
      tx.update(params, clobbered, params)  # Caught, not silent.
    fields_only = lambda path, _: isinstance(
        path[-1], optax.tree_utils.NamedTupleKey)
    state = optax.tree.set(state, fields_only, fisher=new)
    chex.assert_trees_all_equal(state[0].anchor, params)
    chex.assert_trees_all_equal(state[0].fisher, new)
