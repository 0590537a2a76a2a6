"""The built-in rewrites, one module each; importing this package registers them."""

from . import center_unembed, center_writing_weights, fold_ln, fold_value_biases, ln_to_rms  # noqa: F401
