"""Training: state, optimizers, the sharded train step, checkpoints and the loop."""
