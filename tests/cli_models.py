"""Model and data factories for the CLI tests (`tests.cli_models:small_model`): the zoo's
two-head model (a conv trunk with BatchNorm shared by a per-pixel head and a classifier)."""
from .zoo import ZOO_BY_NAME

_ENTRY = ZOO_BY_NAME["two_heads_dict"]


def small_model():
    return _ENTRY.build(seed=0)


def small_data():
    """(batches, task_losses) for small_model."""
    return _ENTRY.batches(2), _ENTRY.task_losses


def not_a_model():
    return 42


def small_transformer():
    """A token model on nn.TransformerEncoder (attention heads, LayerNorms) with two heads."""
    import torch

    from .test_torch_transformer import EncoderTasks

    torch.manual_seed(0)
    return EncoderTasks(norm_first=True).eval()
