"""Fine-tuning LoRA adapters: data files, settings, the training loop and its worker process."""
