"""Fine-tuning in the gateway: training files, jobs, the scheduler and where workers run."""
