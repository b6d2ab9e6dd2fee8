"""Stage III: Flow-GRPO reinforcement learning with LDAM and the reward models."""
