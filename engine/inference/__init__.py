"""Using trained runs: loading a model and its tokenizer for inference, and the task metrics."""
