"""megamoe's model: pure PyTorch; kernels come through `kernels`, parallelism is applied from outside."""
from megamoe.model.transformer import ModelOutput, Transformer  # noqa: F401
