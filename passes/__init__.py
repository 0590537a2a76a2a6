"""The built-in rewrites, one module each.

This module itself is light: it names the passes, their summaries and their order, so
that listing them (`lensgraph passes`) imports nothing heavy. `load()` imports the pass
modules, which registers them with the pass manager.
"""

from __future__ import annotations

from typing import NamedTuple

# TransformerLens's default processing, in the order it applies it.
DEFAULT_PIPELINE = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")


class Entry(NamedTuple):
    summary: str
    after: tuple[str, ...] = ()  # must run after these when both are in a pipeline
    needs: tuple[str, ...] = ()  # must have run before: in the pipeline or already applied to the model


CATALOG = {
    "fold_ln": Entry("fold norm scales and biases into the linear maps that read them"),
    "center_writing_weights": Entry("centre the weights that write into the residual stream over d_model",
                                    after=("fold_ln",)),
    "center_unembed": Entry("centre the unembedding over the vocabulary"),
    "fold_value_biases": Entry("fold value biases into the attention output bias", after=("fold_ln",)),
    "ln_to_rms": Entry("replace each LayerNorm on the centred residual stream by the RMSNorm form (optional)",
                       after=("fold_ln", "center_writing_weights"), needs=("fold_ln", "center_writing_weights")),
    "refactor_factored_attn_matrices": Entry(
        "re-factor each head's QK and OV products evenly through an SVD (optional)",
        after=("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")),
}


def load() -> None:
    """Import (and so register) every built-in pass."""
    from . import (  # noqa: F401
        center_unembed,
        center_writing_weights,
        fold_ln,
        fold_value_biases,
        ln_to_rms,
        refactor_factored_attn_matrices,
    )


def from_switches(fold_ln: bool = True, center_writing_weights: bool = True, center_unembed: bool = True,
                  fold_value_biases: bool = True, refactor_factored_attn_matrices: bool = False) -> list[str]:
    """The pipeline TransformerLens's `from_pretrained` switches of the same names ask for, in order."""
    switches = {"fold_ln": fold_ln, "center_writing_weights": center_writing_weights,
                "center_unembed": center_unembed, "fold_value_biases": fold_value_biases,
                "refactor_factored_attn_matrices": refactor_factored_attn_matrices}
    for name, value in switches.items():
        if not isinstance(value, bool):
            from lensgraph.errors import BadInputError

            raise BadInputError(f"{name} must be True or False, not {value!r}")
    return [name for name, on in switches.items() if on]
