"""The model: GPT1Config, the reference ops (the spec), GPT1, task heads, the Hugging Face
openai-gpt I/O and the tokenizer."""
