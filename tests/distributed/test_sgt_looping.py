"""SGT looping on gloo ranks: the loop's math, its two implementations, TP parity, entropy, callback.

Tiny GPT: 64 hidden, 4 query heads in 2 KV groups (GQA), head dim 16, SwiGLU, RoPE, seq 16.
Tolerance: 1e-5 of the reference's largest magnitude in fp32, as in test_parity; a wrong slice,
scale or missing reduction moves results by O(1) relative.
"""

import io
import math

import pytest
import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import OptimizerConfig
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule

from megatron_ext.capability import TrainContext
from megatron_ext.models.layer_spec import decoder_block_spec, gpt_layer_spec
from megatron_ext.optim import build_optimizer
from megatron_ext.parallel import ParallelSizes, full_named_tensors, load_full_named_tensors, main_grad_or_grad
from megatron_ext.parallel.state import process_groups
from megatron_ext.sgt.callback import SGTCallback
from megatron_ext.sgt.config import LoopingConfig
from megatron_ext.sgt.flops import GPTShape
from megatron_ext.sgt.looped_layer import LoopedTransformerLayer, looped_layer_spec
from megatron_ext.testing.distributed import run_distributed
from megatron_ext.training.ddp import wrap_with_ddp
from megatron_ext.training.step import gpt_forward_step, train_step
from tests.distributed.bodies import SEQ, VOCAB, local_micro_batches, make_batch, tiny_config_kwargs

RTOL = 1e-5
HEADS = 4


class HeadwiseCausalAttention(MegatronModule):
    """A core attention with ``forward_heads`` (the seam a hybrid FA/SWA module provides): causal
    attention, and a record of the KV heads each ``forward_heads`` call was given."""

    def __init__(
        self,
        config,
        layer_number,
        attn_mask_type,
        attention_type,
        attention_dropout=None,
        softmax_scale=None,
        cp_comm_type=None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        self.heads_per_group = config.num_attention_heads // config.num_query_groups
        self.scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.kv_heads_seen = []

    def forward(
        self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None
    ):
        return self._attend(query, key, value)

    def forward_heads(self, query, key, value, local_kv_heads):
        # The contract: query holds all query heads of each listed KV head, in order.
        assert query.size(2) == len(local_kv_heads) * self.heads_per_group
        self.kv_heads_seen.append(list(local_kv_heads))
        return self._attend(query, key, value)

    def _attend(self, query, key, value):
        q = query.permute(1, 2, 0, 3)
        k = key.repeat_interleave(self.heads_per_group, dim=2).permute(1, 2, 0, 3)
        v = value.repeat_interleave(self.heads_per_group, dim=2).permute(1, 2, 0, 3)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return out.permute(2, 0, 1, 3).flatten(2)


def build_looped_gpt(num_layers=2, sequence_parallel=None, forward_heads=False, seed=1234):
    """Tiny GPT whose layers are LoopedTransformerLayers, for the current parallel state."""
    torch.manual_seed(seed)
    config = TransformerConfig(**tiny_config_kwargs(num_layers, sequence_parallel, num_attention_heads=HEADS))
    layer = gpt_layer_spec(core_attention=HeadwiseCausalAttention) if forward_heads else gpt_layer_spec()
    return GPTModel(
        config=config,
        transformer_layer_spec=decoder_block_spec(config, [looped_layer_spec(layer)] * num_layers),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        position_embedding_type="rope",
        share_embeddings_and_output_weights=False,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )


def looped_layers(model):
    return {m.layer_index: m for m in model.modules() if isinstance(m, LoopedTransformerLayer)}


def initial_weights(num_layers=2):
    return full_named_tensors(build_looped_gpt(num_layers))


def configure(model, loops, kept_heads_path=True):
    """``loops``: {layer: (depth, method, factors)}; other layers stay vanilla."""
    for index, layer in looped_layers(model).items():
        depth, method, factors = loops.get(index, (0, "sgt", [1.0] * HEADS))
        layer.set_loop(depth, method)
        layer.set_head_factors(factors)
        layer.use_kept_heads_path = kept_heads_path


def max_rel_diff(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30))


def assert_close(actual, expected, what, rtol=RTOL):
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys(), what
        for name in expected:
            assert_close(actual[name], expected[name], f"{what} {name}", rtol)
        return
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    diff = max_rel_diff(actual, expected)
    assert diff <= rtol, f"{what}: max relative difference {diff:.2e} > {rtol:.0e}"


# -- rank bodies -------------------------------------------------------------------------------


def manual_loop_body():
    """(a) layer output with a depth-1 loop, all heads kept, vs the sublayer applied twice by hand."""
    gpt = build_looped_gpt()
    layer = looped_layers(gpt)[1]
    rope = gpt.rotary_pos_emb(SEQ)
    x = torch.randn(SEQ, 2, 64, generator=torch.Generator().manual_seed(7))
    attn = layer.self_attention

    def attention_sublayer(h):
        out, bias = attn(layer.input_layernorm(h), attention_mask=None, rotary_pos_emb=rope)
        assert bias is None
        return h + out

    with torch.no_grad():
        looped_by_hand = attention_sublayer(attention_sublayer(x))
        expected = looped_by_hand + layer.mlp(layer.pre_mlp_layernorm(looped_by_hand))[0]
        vanilla = attention_sublayer(x)
        vanilla = vanilla + layer.mlp(layer.pre_mlp_layernorm(vanilla))[0]
        outputs = {"vanilla": layer(hidden_states=x, attention_mask=None, rotary_pos_emb=rope)[0]}
        for kept_path in (True, False):
            configure(gpt, {1: (1, "sgt", [1.0] * HEADS)}, kept_heads_path=kept_path)
            outputs[f"kept_path={kept_path}"] = layer(hidden_states=x, attention_mask=None, rotary_pos_emb=rope)[0]
    return {"expected": expected, "vanilla_expected": vanilla, "outputs": outputs}


def loop_gradients_body(weights, cases, sequence_parallel=None, forward_heads=False):
    """Per case ``{name: (loops, kept_heads_path)}``: per-token losses and full gradients of one
    forward/backward (Megatron DDP, so sequence-parallel norm gradients are reduced too)."""
    results = {}
    for name, (loops, kept_path) in cases.items():
        gpt = build_looped_gpt(sequence_parallel=sequence_parallel, forward_heads=forward_heads)
        load_full_named_tensors(gpt, weights)
        configure(gpt, loops, kept_heads_path=kept_path)
        model = wrap_with_ddp([gpt])
        batch = make_batch(0)
        get_forward_backward_func()(
            forward_step_func=gpt_forward_step,
            data_iterator=iter([batch]),
            model=model,
            num_microbatches=1,
            seq_length=SEQ,
            micro_batch_size=2,
            forward_only=False,
        )
        with torch.no_grad():
            per_token = gpt(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        kv_heads_seen = [m.kv_heads_seen for m in gpt.modules() if isinstance(m, HeadwiseCausalAttention)]
        results[name] = {
            "per_token": per_token,
            "grads": full_named_tensors(model[0], main_grad_or_grad),
            "kv_heads_seen": kv_heads_seen,
        }
    return results


def entropy_body():
    """(e) the hook's entropy vs the last row of the dense attention matrix."""
    gpt = build_looped_gpt()
    layer = looped_layers(gpt)[1]
    observed, captured, loop_passes = [], [], []
    layer.set_entropy_sink(lambda first, last: (observed.append(first), loop_passes.append(last)))
    layer.self_attention.core_attention.register_forward_pre_hook(
        lambda module, args: captured.append((args[0].detach(), args[1].detach()))
    )
    batch = make_batch(0)
    gpt.train()
    gpt(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    gpt.eval()
    gpt(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])  # not observed
    layer.set_entropy_sink(None)
    gpt.train()
    gpt(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])  # hook removed
    query, key = captured[0]  # [s, b, np, hn], [s, b, ng, hn] after RoPE
    q = query.permute(1, 2, 0, 3).double()
    k = key.repeat_interleave(HEADS // key.size(2), dim=2).permute(1, 2, 0, 3).double()
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))  # [b, np, s, s]
    causal = torch.ones(SEQ, SEQ, dtype=torch.bool).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)[:, :, -1]  # [b, np, T]
    reference = (-(probs * probs.clamp_min(1e-300).log()).sum(-1) / math.log(SEQ)).mean(0)
    assert loop_passes == [None]  # the layer does not loop: no loop-pass entropy
    return {"observed": observed, "reference": reference}


def looping_config(**overrides):
    kwargs = dict(
        enabled=True,
        first_selection_step=2,
        window=2,
        top_k_layers=2,
        max_selected_layers=2,
        max_loop_depth=2,
        num_keep_heads=2,
        exclude_layers=[0],
    )
    kwargs.update(overrides)
    return LoopingConfig(**kwargs)


def _train_with_callback(weights, callback, steps, run_dir, start_step=0, model=None, optimizer=None):
    if model is None:
        gpt = build_looped_gpt(num_layers=4)
        load_full_named_tensors(gpt, weights)
        model = wrap_with_ddp([gpt])
        optimizer = build_optimizer(OptimizerConfig(optimizer="adam", lr=1e-5, adam_eps=1e-5), model)
    ctx = TrainContext(
        config=None, pg_collection=process_groups(), model=model, optimizer=optimizer, run_dir=run_dir, step=start_step
    )
    callback.on_train_start(ctx)
    dp_size = parallel_state.get_data_parallel_world_size()
    metrics = []
    for _ in range(steps):
        callback.on_step_begin(ctx)
        indices = local_micro_batches(list(range(ctx.step * 4, ctx.step * 4 + 4)))
        result = train_step(
            model,
            optimizer,
            iter([make_batch(i) for i in indices]),
            num_microbatches=4 // dp_size,
            seq_length=SEQ,
            micro_batch_size=2,
        )
        ctx.step += 1
        metrics.append(callback.on_step_end(ctx, result))
    return metrics, model, optimizer, ctx


def callback_body(weights, steps, run_dir, resume_at=None, overrides=None):
    """(d) SGTCallback over ``steps`` training steps of a 4-layer model; with ``resume_at``, the
    callback is checkpointed there (through torch.save) and a fresh one continues from the state."""
    shape = GPTShape(
        hidden_size=64,
        num_layers=4,
        num_heads=HEADS,
        num_kv_heads=2,
        head_dim=16,
        ffn_hidden_size=128,
        vocab_size=VOCAB,
        seq_length=SEQ,
        batch_size=8,
    )

    def new_callback():
        return SGTCallback(
            looping_config(**(overrides or {})), num_layers=4, num_heads=HEADS, num_kv_heads=2, flops_shape=shape
        )

    callback = new_callback()
    first = steps if resume_at is None else resume_at
    metrics, model, optimizer, ctx = _train_with_callback(weights, callback, first, run_dir)
    saved = None
    if resume_at is not None:
        buffer = io.BytesIO()
        torch.save(callback.state_dict(), buffer)
        saved = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
        callback = new_callback()
        callback.load_state_dict(saved)
        more, *_ = _train_with_callback(
            weights, callback, steps - resume_at, run_dir, start_step=ctx.step, model=model, optimizer=optimizer
        )
        metrics += more
    callback.on_train_end(ctx)
    layers = looped_layers(model[0].module)
    return {
        "metrics": metrics,
        "state": callback.state_dict(),
        "saved": saved,
        "layer_state": {i: (m.loop_depth, m.head_factors, m._entropy_hook is not None) for i, m in layers.items()},
    }


# -- tests -------------------------------------------------------------------------------------


def test_loop_equals_attention_sublayer_applied_twice():
    result = run_distributed(manual_loop_body, 1)[0]
    assert_close(result["outputs"]["vanilla"], result["vanilla_expected"], "depth 0")
    for name in ("kept_path=True", "kept_path=False"):
        assert_close(result["outputs"][name], result["expected"], f"depth 1, {name}")
    assert max_rel_diff(result["expected"], result["vanilla_expected"]) > 1e-3, "the loop must change the output"


KEPT_CASES = {
    "heads 0,3 (two KV groups)": [1.0, 0.0, 0.0, 1.0],
    "heads 0,1 (one KV group)": [1.0, 1.0, 0.0, 0.0],
    "head 2": [0.0, 0.0, 1.0, 0.0],
}


@pytest.mark.parametrize("forward_heads", [False, True], ids=["sdpa", "forward_heads"])
def test_kept_heads_path_equals_masked_all_heads(forward_heads):
    weights = run_distributed(initial_weights, 1)[0]
    cases = {}
    for name, factors in KEPT_CASES.items():
        loops = {1: (2, "sgt", factors)}  # depth 2: the second pass sees the first one's output
        cases[f"{name} kept"] = (loops, True)
        cases[f"{name} masked"] = (loops, False)
    results = run_distributed(loop_gradients_body, 1, weights=weights, cases=cases, forward_heads=forward_heads)[0]
    vanilla = run_distributed(loop_gradients_body, 1, weights=weights, cases={"vanilla": ({}, True)})[0]["vanilla"]
    for name in KEPT_CASES:
        kept, masked = results[f"{name} kept"], results[f"{name} masked"]
        assert_close(kept["per_token"], masked["per_token"], f"{name}: per-token loss")
        assert_close(kept["grads"], masked["grads"], f"{name}: grads")
        assert max_rel_diff(kept["per_token"], vanilla["per_token"]) > 1e-4, f"{name}: the loop must act"
        qkv = "decoder.layers.1.self_attention.linear_qkv.weight"
        assert max_rel_diff(kept["grads"][qkv], vanilla["grads"][qkv]) > 1e-3
    if forward_heads:
        # Layer 1's loop passes (2 per forward; a training and a no-grad forward) hand
        # forward_heads only the KV group of the kept head.
        seen = results["head 2 kept"]["kv_heads_seen"][1]
        assert seen == [[1]] * 4, seen


TP_CASES = {
    "kept heads on one rank": ({1: (1, "sgt", [1.0, 1.0, 0.0, 0.0])}, True),
    "kept heads on both ranks": ({1: (1, "sgt", [0.0, 1.0, 1.0, 0.0])}, True),
    "fading (all heads)": ({1: (1, "sgt", [1.0, 0.5, 0.25, 1.0])}, True),
    "two layers, depth 2": ({0: (2, "sgt", [0.0, 0.0, 0.0, 1.0]), 1: (1, "sgt", [0.0, 1.0, 0.0, 0.0])}, True),
    "block": ({1: (1, "block", [1.0] * HEADS)}, True),
}


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "tp+sp"])
def test_tensor_parallel_matches_single_rank(sequence_parallel):
    weights = run_distributed(initial_weights, 1)[0]
    ref = run_distributed(loop_gradients_body, 1, weights=weights, cases=TP_CASES)[0]
    tp = run_distributed(
        loop_gradients_body,
        2,
        ParallelSizes(tp=2),
        weights=weights,
        cases=TP_CASES,
        sequence_parallel=sequence_parallel,
    )
    for name in TP_CASES:
        for rank in tp:
            assert_close(rank[name]["per_token"], ref[name]["per_token"], f"TP=2 {name}: per-token loss")
        assert_close(tp[0][name]["grads"], ref[name]["grads"], f"TP=2 {name}: grads")


def test_entropy_hook_matches_dense_attention():
    result = run_distributed(entropy_body, 1)[0]
    assert len(result["observed"]) == 1, "one observation: training forward only, none once removed"
    assert_close(result["observed"][0], result["reference"], "last-query entropy")


def _assert_same_callback_state(actual, expected, rtol=0.0):
    assert actual["scheduler"] == expected["scheduler"]
    assert actual["events"] == expected["events"]
    ema, ref = actual["tracker"]["ema"], expected["tracker"]["ema"]
    assert ema.keys() == ref.keys()
    for layer in ref:
        diff = max_rel_diff(ema[layer], ref[layer])
        assert diff <= rtol, f"EMA of layer {layer}: relative difference {diff:.1e}"


def peaked_attention(weights, num_layers):
    """Scale each layer's QKV weight differently: at the default init every head attends almost
    uniformly (entropy 0.9999 everywhere), and layers would be ranked by noise."""
    weights = dict(weights)
    for layer in range(num_layers):
        name = f"decoder.layers.{layer}.self_attention.linear_qkv.weight"
        weights[name] = weights[name] * (8.0 + 6.0 * layer)
    return weights


def test_callback_resumes_exactly_and_agrees_across_layouts(tmp_path):
    weights = peaked_attention(run_distributed(initial_weights, 1, num_layers=4)[0], 4)
    steps = 7
    ref = run_distributed(callback_body, 1, weights=weights, steps=steps, run_dir=str(tmp_path))[0]
    state = ref["state"]
    kinds = [event["kind"] for event in state["events"]]
    assert kinds[0] == "select" and state["events"][0]["step"] == 2, state["events"]
    assert len(kinds) >= 2, f"the schedule must take a second decision: {state['events']}"
    assert (tmp_path / "plots" / "sgt_entropy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = ref["metrics"]
    assert metrics[0]["sgt/looped_layers"] == 0 and metrics[0]["sgt/flops_overhead"] == 0.0
    assert metrics[2]["sgt/looped_layers"] == 1 and metrics[2]["sgt/flops_overhead"] > 0.0
    assert all(f"sgt/entropy/{layer}" in metrics[-1] for layer in range(4))
    # Fading: all heads loop at steps 3 and 4; kept heads only from step 5 (window 2: the factors
    # reach 0 at 2 + 2 + 1).
    # Step 5 runs two passes (deepened at 4) of the kept heads only: less than two passes of all heads.
    assert metrics[2]["sgt/flops_overhead"] == metrics[3]["sgt/flops_overhead"]
    assert metrics[4]["sgt/loop_depths"][2] == 2
    assert metrics[4]["sgt/flops_overhead"] < 2 * metrics[3]["sgt/flops_overhead"]

    resumed = run_distributed(
        callback_body, 1, weights=weights, steps=steps, run_dir=str(tmp_path / "resumed"), resume_at=3
    )[0]
    assert resumed["saved"]["scheduler"]["selected"], "the checkpoint is taken after the first selection"
    _assert_same_callback_state(resumed["state"], state)
    assert resumed["metrics"] == metrics
    assert resumed["layer_state"] == ref["layer_state"]

    for sizes in (ParallelSizes(tp=2), ParallelSizes(pp=2), ParallelSizes()):  # the last: DP=2
        par = run_distributed(callback_body, 2, sizes, weights=weights, steps=steps, run_dir=str(tmp_path / "par"))
        for rank in par:
            _assert_same_callback_state(rank["state"], state, rtol=1e-4)
        looped = {layer: depth_factors for rank in par for layer, depth_factors in rank["layer_state"].items()}
        assert looped == ref["layer_state"], sizes


def test_entropy_stops_with_the_schedule_unless_asked_to_go_on(tmp_path):
    weights = peaked_attention(run_distributed(initial_weights, 1, num_layers=4)[0], 4)
    small = {"max_selected_layers": 1, "max_loop_depth": 1}  # frozen at the first window end (step 4)
    stop = run_distributed(callback_body, 1, weights=weights, steps=7, run_dir=str(tmp_path / "a"), overrides=small)[0]
    go_on = run_distributed(
        callback_body,
        1,
        weights=weights,
        steps=7,
        run_dir=str(tmp_path / "b"),
        overrides={**small, "compute_entropy_after_fixed": True},
    )[0]
    logged = [any(k.startswith("sgt/entropy/") for k in m) for m in stop["metrics"]]
    assert logged[0] and not logged[-1]  # no stale scores once nothing is measured
    assert all(any(k.startswith("sgt/entropy/") for k in m) for m in go_on["metrics"])
    assert [e["kind"] for e in go_on["state"]["events"]] == [e["kind"] for e in stop["state"]["events"]]
