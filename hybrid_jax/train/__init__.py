"""Training: sharded state, the loss, AdamW as OLMo sets it up, and the train step (the data
they train on: ``hybrid_jax.data``)."""

from hybrid_jax.data.pipeline import PackedDataset
from hybrid_jax.data.token_files import DataError, token_file, tokenize_text
from hybrid_jax.train.loss import lm_loss_sums, next_token_targets
from hybrid_jax.train.optimizer import (
    OptimizerConfig,
    make_optimizer,
    make_schedule,
    weight_decay_mask,
)
from hybrid_jax.train.state import (
    ModelTemplate,
    TrainState,
    abstract_train_state,
    init_train_state,
    lower_sharded_init,
    model_template,
    train_state_shardings,
    with_shardings,
)
from hybrid_jax.train.step import jit_train_step, make_loss_fn, make_train_step, scan_steps

__all__ = [
    "DataError",
    "PackedDataset",
    "ModelTemplate",
    "OptimizerConfig",
    "TrainState",
    "abstract_train_state",
    "init_train_state",
    "jit_train_step",
    "lm_loss_sums",
    "lower_sharded_init",
    "make_loss_fn",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "model_template",
    "token_file",
    "tokenize_text",
    "next_token_targets",
    "scan_steps",
    "train_state_shardings",
    "weight_decay_mask",
    "with_shardings",
]
