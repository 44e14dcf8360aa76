"""GPT-1 engine: the paper's model on fused Triton (CUDA) and C++ (CPU) kernels.

from engine import GPT1, GPT1Config
"""

from engine.model.config import GPT1Config

__all__ = ["GPT1", "GPT1Config", "GPT1Output"]


def __getattr__(name: str):
    # The model (and with it the op library) is imported on first use, so that
    # `import engine` and the CLIs' --help stay fast.
    if name in ("GPT1", "GPT1Output"):
        from engine.model import gpt1 as model

        return getattr(model, name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
