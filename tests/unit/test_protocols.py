"""The cross-method protocols of ``megatron_ext.models.protocols`` and the classes that implement them.

The SGT loop and the cached decoder choose their path by ``isinstance(module, Protocol)``: a method
renamed in an implementing class (or in a protocol) would silently send them to the fallback path.
These checks pin each protocol's members and each implementing class's methods to them.
"""

import inspect

import pytest
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_ext.consa.attention import HybridCoreAttention
from megatron_ext.models.protocols import (
    AttentionPairCounter,
    DecodePassesLayer,
    HeadSubsetAttention,
    KeptHeadsLayer,
    KeyPlanAttention,
    QueryHeadSubsetAttention,
)
from megatron_ext.sgt.looped_layer import LoopedTransformerLayer

MEMBERS = {
    HeadSubsetAttention: {"forward_heads"},
    QueryHeadSubsetAttention: {"forward_query_heads"},
    KeyPlanAttention: {"attended_keys", "kv_cache_plan"},
    AttentionPairCounter: {"attention_pairs"},
    DecodePassesLayer: {"decode_passes"},
    KeptHeadsLayer: {"kept_heads_qkv", "attend_heads", "kept_heads_proj"},
}

IMPLEMENTATIONS = {
    HybridCoreAttention: [HeadSubsetAttention, QueryHeadSubsetAttention, KeyPlanAttention, AttentionPairCounter],
    LoopedTransformerLayer: [DecodePassesLayer, KeptHeadsLayer, AttentionPairCounter],
}


def parameters(function) -> list:
    return list(inspect.signature(function).parameters)


def implements(cls: type, protocol: type) -> bool:
    """Whether ``cls`` defines every member of ``protocol`` itself (an explicit subclass of a protocol
    that lacks one inherits the protocol's empty stub), with the protocol's parameter names."""
    for name in MEMBERS[protocol]:
        method = getattr(cls, name, None)
        if method is None or method is getattr(protocol, name):
            return False
        if parameters(method) != parameters(getattr(protocol, name)):
            return False
    return True


@pytest.mark.parametrize("protocol", list(MEMBERS), ids=lambda p: p.__name__)
def test_protocol_members(protocol):
    declared = {
        name for name, value in vars(protocol).items() if inspect.isfunction(value) and not name.startswith("_")
    }
    assert declared == MEMBERS[protocol]


@pytest.mark.parametrize(
    "cls, protocol",
    [(cls, p) for cls, protocols in IMPLEMENTATIONS.items() for p in protocols],
    ids=lambda x: x.__name__,
)
def test_implementing_classes_satisfy_their_protocols(cls, protocol):
    assert issubclass(cls, protocol)
    assert implements(cls, protocol), f"{cls.__name__} lacks {protocol.__name__}'s {sorted(MEMBERS[protocol])}"


@pytest.mark.parametrize("protocol", list(MEMBERS), ids=lambda p: p.__name__)
def test_plain_megatron_modules_implement_none(protocol):
    assert not issubclass(DotProductAttention, protocol)
    assert not issubclass(TransformerLayer, protocol)


def test_structural_check_needs_every_member():
    class WholeGroups:  # a core attention with forward_heads only: whole KV groups, no query-head subsets
        def forward_heads(self, query, key, value, local_kv_heads):
            return query

    class HalfPlan:
        def attended_keys(self):
            return [(None, 0)]

    assert isinstance(WholeGroups(), HeadSubsetAttention)
    assert not isinstance(WholeGroups(), QueryHeadSubsetAttention)
    assert not isinstance(HalfPlan(), KeyPlanAttention)


def test_renamed_method_fails_the_check():
    class Renamed(DotProductAttention, HeadSubsetAttention):  # an explicit subclass inherits the empty stub
        def forward_kv_heads(self, query, key, value, local_kv_heads):
            return query

    class Reordered(DotProductAttention, HeadSubsetAttention):
        def forward_heads(self, query, local_kv_heads, key, value):
            return query

    assert not implements(Renamed, HeadSubsetAttention)
    assert not implements(Reordered, HeadSubsetAttention)
