"""Test-wide JAX settings: silent broadcasting and dtype promotion are errors."""

import os

import jax

jax.config.update('jax_numpy_rank_promotion', 'raise')
jax.config.update('jax_numpy_dtype_promotion', 'strict')

# Real raw datasets, staged beside the project (see ../shared/data/README.md).
_DEFAULT_RAW = os.path.join(os.path.dirname(__file__), '..', '..', 'shared',
                            'data')
RAW_DIR = os.environ.get('METACF_RAW_DIR') or (
    os.path.abspath(_DEFAULT_RAW) if os.path.isdir(_DEFAULT_RAW) else None)
