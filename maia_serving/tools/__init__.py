"""What the `maia-serving` verbs run beyond the emulator: host and KV calibration, checkpoint
surgery (checkpoints/) and the locally trained models (training/). These import torch."""
