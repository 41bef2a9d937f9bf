"""lowbit's compiler passes, one per module; importing the package registers every pass by name.

See ``README.md`` beside this file for the invariants every pass keeps and the table of passes.
"""

from lowbit.passes import (  # noqa: F401  (each module registers its pass)
    annotate_quantization, canonicalize_attention, choose_attention_scheme, choose_attention_windows, choose_cfg_sharing,
    choose_quant_params, convert_to_quantized_ops, detect_outlier_dim, fold_fake_quantizers, group_activations,
    insert_cfg_observers, insert_fake_quantizers, insert_observers, insert_window_observers, reconstruct_weights,
    split_start_token, train_quantized,
)
from lowbit.passes.base import PASSES, Pass, PassContext, PassError, PassResult
from lowbit.passes.pipeline import Pipeline
from lowbit.passes.registry import create

__all__ = ["PASSES", "Pass", "PassContext", "PassError", "PassResult", "Pipeline", "create"]
