"""The built-in rewrites, one module each; importing this package registers them."""

from . import (  # noqa: F401
    center_unembed,
    center_writing_weights,
    fold_ln,
    fold_value_biases,
    ln_to_rms,
    refactor_factored_attn_matrices,
)
