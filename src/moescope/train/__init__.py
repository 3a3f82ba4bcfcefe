"""Training: configs, the trainer loop, checkpoints, experiment arms."""
