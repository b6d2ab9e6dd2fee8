"""The names of what a model folder and a training run hold, defined once (and importable without torch)."""

from __future__ import annotations

import os

CONFIG_FILE = "config.yaml"  # a model folder's ModelConfig
WEIGHTS_FILE = "model.safetensors"  # a model folder's trained tensors
CHECKPOINT_DIR = "checkpoints"  # a run's resumable checkpoints
TRAIN_LOG = "train_log.jsonl"  # Stages I-II: one row per step
RL_LOG = "rl_log.jsonl"  # Stage III: one row per epoch, beside the policy's weights
RL_EVAL_LOG = "rl_eval.jsonl"  # Stage III with rl.eval_prompts: one row per held-out evaluation
TRAIN_CONFIG = "train_config.yaml"  # Stages I-II: the resolved TrainConfig of the run
RL_CONFIG = "rl_config.yaml"  # Stage III: the resolved RLConfig of the run
RAW_WEIGHTS = "raw_trainable.safetensors"  # Stages I-II with an EMA: the last raw weights
RUN_RECORD = "run.json"  # a finished run: stage, steps, final loss, data, command (what resume checks)
MODEL_CARD = "README.md"  # a trained folder's model card
COMPONENTS_FILE = "components.json"  # the sha256 of the frozen parts a model folder refers to outside itself
COMPONENT_DIRS = ("vlm", "transformer", "vae")  # frozen parts copied into a model folder


def launcher_rank() -> int:
    """This process's rank as a distributed launcher (torchrun, accelerate launch) sets it in ``RANK``, 0 when
    run alone: the one process that may remove or write a run's shared files before the accelerator exists."""
    return int(os.environ.get("RANK", "0"))
