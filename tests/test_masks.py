"""Tests for the one leaf-selection form (metacf.masks / metacf._src.masks)."""

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

import metacf
from metacf import masks


class _Layer(NamedTuple):
  kernel: jax.Array
  bias: jax.Array


def _tree():
  return {'encoder': {'layers': [_Layer(jnp.ones([2, 3]), jnp.zeros([3])),
                                 _Layer(jnp.ones([3, 3]), jnp.zeros([3]))]},
          'head': {'kernel': jnp.ones([3, 1])}}


class LeafPathsTest(chex.TestCase):

  def test_slash_joined_paths_match_keystr(self):
    tree = _tree()
    want = [jax.tree_util.keystr(kp, simple=True, separator='/')
            for kp, _ in jax.tree.flatten_with_path(tree)[0]]
    self.assertEqual(masks.leaf_paths(tree), want)
    self.assertEqual(masks.leaf_paths(tree), [
        'encoder/layers/0/kernel', 'encoder/layers/0/bias',
        'encoder/layers/1/kernel', 'encoder/layers/1/bias', 'head/kernel'])


class ResolveMaskTest(chex.TestCase):

  def test_regex_is_searched_in_the_path(self):
    got = masks.resolve_mask(r'layers/1|head', _tree())
    self.assertEqual(jax.tree.leaves(got), [False, False, True, True, True])
    got = masks.resolve_mask('kernel$', _tree())
    self.assertEqual(jax.tree.leaves(got), [True, False, True, False, True])

  def test_callable_sees_path_and_leaf(self):
    got = masks.resolve_mask(lambda path, leaf: leaf.ndim >= 2
                             and 'encoder' in path, _tree())
    self.assertEqual(jax.tree.leaves(got), [True, False, True, False, False])

  def test_pytree_of_bools_passes_through(self):
    spec = jax.tree.map(lambda leaf: leaf.ndim == 1, _tree())
    got = masks.resolve_mask(spec, _tree())
    self.assertEqual(jax.tree.structure(got), jax.tree.structure(_tree()))
    self.assertEqual(jax.tree.leaves(got), jax.tree.leaves(spec))
    all_false = jax.tree.map(lambda _: False, _tree())
    self.assertFalse(any(jax.tree.leaves(masks.resolve_mask(all_false,
                                                            _tree()))))

  def test_none_selects_everything(self):
    self.assertTrue(all(jax.tree.leaves(masks.resolve_mask(None, _tree()))))

  def test_no_match_allowed_when_asked(self):
    got = masks.resolve_mask('decoder', _tree(), require_match=False)
    self.assertFalse(any(jax.tree.leaves(got)))

  def test_bad_specs(self):
    with self.assertRaisesRegex(
        ValueError, "resolve_mask: mask matched no leaf; paths are like "
        r"'encoder/layers/0/kernel', 'encoder/layers/0/bias', "
        r"'encoder/layers/1/kernel', 'encoder/layers/1/bias', \.\.\."):
      masks.resolve_mask('decoder', _tree())
    with self.assertRaisesRegex(
        ValueError, 'resolve_mask: targets must have the same pytree '
        r'structure as tree \(or be a callable \(path, leaf\) -> bool or a '
        r'regex string\)'):
      masks.resolve_mask({'head': True}, _tree(), name='targets')
    with self.assertRaisesRegex(
        TypeError, 'resolve_mask: mask leaves must be Python bools '
        r'\(static\), got ArrayImpl'):
      masks.resolve_mask(jax.tree.map(lambda l: jnp.array(True), _tree()),
                         _tree())
    with self.assertRaisesRegex(
        TypeError, 'resolve_mask: mask must return a Python bool for each '
        "leaf, got int for path 'encoder/layers/0/kernel'"):
      masks.resolve_mask(lambda path, leaf: 1, _tree())
    with self.assertRaisesRegex(
        ValueError, r"resolve_mask: mask must be a valid regular expression, "
        r"got '\['"):
      masks.resolve_mask('[', _tree())

  def test_public_aliases(self):
    self.assertIs(metacf.masks, masks)
    for name in ('Params', 'ApplyFn', 'LossFn', 'MaskSpec', 'PRNGKey'):
      self.assertTrue(hasattr(metacf.typing, name), name)
