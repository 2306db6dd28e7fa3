"""Training: batches from trajectories, the jitted SFT/RL update, the optimizer, checkpoints."""
