"""Ownership read off the graph equals the hand-written expectation for every zoo model."""
import warnings

import pytest
import torch.nn as nn

from disparse_fx.passes.errors import DisparseWarning
from disparse_fx.passes.ownership import analyze_ownership, graph_to_networkx
from disparse_fx.passes.trace import trace_model

from .zoo import ZOO


@pytest.mark.parametrize("entry", ZOO, ids=lambda e: e.name)
def test_ownership_matches_expectation(entry):
    model = entry.build()
    own = analyze_ownership(trace_model(model), reference=model)
    assert dict(own.owners) == dict(entry.owners)
    # keyed by the ORIGINAL model's names (tied weights: first name only)
    assert set(own.owners) == {n for n, _ in model.named_parameters()}


def test_kinds_partition_parameters():
    entry = next(e for e in ZOO if e.name == "with_unused")
    model = entry.build()
    own = analyze_ownership(trace_model(model), reference=model)
    assert own.unused_params() == ("spare.weight", "spare.bias")
    assert set(own.shared_params()) == {"trunk.weight", "trunk.bias"}
    assert set(own.task_specific_params("a")) == {"a.weight", "a.bias"}
    assert set(own.domain("b")) == {"trunk.weight", "trunk.bias", "b.weight", "b.bias"}


def test_tied_weight_is_one_entry_with_union_of_tasks():
    entry = next(e for e in ZOO if e.name == "tied_heads")
    model = entry.build()
    own = analyze_ownership(trace_model(model), reference=model)
    assert "head_b.weight" not in own.owners
    assert own.owners["head_a.weight"] == frozenset({"a", "b"})
    assert len(own.uses["head_a.weight"]) == 2  # read by both heads' call_module nodes


def test_networkx_graph_mirrors_fx_edges():
    gm = trace_model(ZOO[0].build())
    g = graph_to_networkx(gm.graph)
    assert g.number_of_nodes() == len(gm.graph.nodes)
    assert all(g.has_edge(i.name, n.name) for n in gm.graph.nodes for i in n.all_input_nodes)


def test_tracing_does_not_copy_or_mutate():
    model = ZOO[0].build()
    gm = trace_model(model)
    assert gm.stem.weight is model.stem.weight
    assert trace_model(gm) is gm  # an already traced GraphModule is accepted as is
    assert isinstance(gm.stem, nn.Conv2d)


class ModeDependent(nn.Module):
    """Functional dropout with training=self.training: torch.fx bakes the mode in."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        import torch.nn.functional as F

        return {"y": F.dropout(self.fc(x), 0.5, training=self.training)}


@pytest.mark.parametrize("train", [True, False])
def test_tracing_warns_when_the_graph_depends_on_the_mode(train):
    model = ModeDependent().train(train)
    with pytest.warns(DisparseWarning) as caught:
        trace_model(model)
    msg = " ".join(str(w.message) for w in caught)
    assert "ModeDependent computes differently in train and eval mode" in msg
    assert f"the traced graph is the {'train' if train else 'eval'}-mode graph" in msg
    assert model.training is train and model.fc.training is train  # modes restored


def test_tracing_a_mode_independent_model_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DisparseWarning)
        trace_model(ZOO[0].build().train())  # nn.Dropout / BatchNorm modules follow .train() / .eval()
