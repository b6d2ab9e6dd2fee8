"""The names of what a model folder and a training run hold, defined once (and importable without torch)."""

from __future__ import annotations

CONFIG_FILE = "config.yaml"  # a model folder's ModelConfig
WEIGHTS_FILE = "model.safetensors"  # a model folder's trained tensors
CHECKPOINT_DIR = "checkpoints"  # a run's resumable checkpoints
TRAIN_LOG = "train_log.jsonl"  # Stages I-II: one row per step
RL_LOG = "rl_log.jsonl"  # Stage III: one row per epoch, beside the policy's weights
