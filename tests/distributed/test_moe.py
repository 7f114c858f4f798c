"""ERNIE 5.0 MoE on gloo ranks: restricted routing under EP, modality-agnostic vs isolated routing,
expert-bias balancing, elastic sub-networks under PP, and resume of the MoE callback's state.

Tiny GPT: 2-4 layers, hidden 32, 4 query heads in 2 KV groups, 8 experts of width 16, top-2,
seq 16. Tolerance for parity: 1e-5 of the reference's largest magnitude in fp32, as in
test_parity; a wrong mask, k or reduction moves results by O(1) relative.
"""

import pytest
import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import OptimizerConfig
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer import TransformerConfig

from megatron_ext.capability import TrainContext
from megatron_ext.data.vocab import MODALITIES
from megatron_ext.models.layer_spec import decoder_block_spec, gpt_layer_spec, mlp_spec, replace_submodule
from megatron_ext.moe import elastic
from megatron_ext.moe.callback import MoECallback
from megatron_ext.moe.config import ElasticConfig, RoutingConfig
from megatron_ext.moe.elastic import ElasticSampler, SubNetwork
from megatron_ext.moe.router import elastic_routers, set_modality_ids, with_router
from megatron_ext.optim import build_optimizer
from megatron_ext.parallel import ParallelSizes, full_named_tensors, load_full_named_tensors, main_grad_or_grad
from megatron_ext.parallel.state import process_groups
from megatron_ext.testing.distributed import run_distributed
from megatron_ext.training.ddp import wrap_with_ddp
from megatron_ext.training.step import gpt_forward_step, train_step
from tests.distributed.bodies import SEQ, VOCAB, local_micro_batches, make_batch, tiny_config_kwargs

RTOL = 1e-5
EXPERTS = 8
TOP_K = 2
HIDDEN = 32


def build_moe_gpt(
    seed=1234, num_layers=2, routing=RoutingConfig(expert_bias=False), score_function="softmax", **overrides
):
    """A tiny MoE GPT with ElasticRouters for the current parallel state; weights from ``seed``."""
    torch.manual_seed(seed)
    kwargs = tiny_config_kwargs(
        num_layers,
        hidden_size=HIDDEN,
        ffn_hidden_size=64,
        num_moe_experts=EXPERTS,
        moe_router_topk=TOP_K,
        moe_ffn_hidden_size=16,
        moe_token_dispatcher_type="alltoall",
        moe_router_load_balancing_type="none",
        moe_router_score_function=score_function,
        moe_router_dtype="fp32",
        moe_router_enable_expert_bias=routing.expert_bias,
        moe_router_bias_update_rate=routing.bias_update_rate,
    )
    kwargs.update(overrides)
    config = TransformerConfig(**kwargs)
    layer = replace_submodule(gpt_layer_spec(), "mlp", with_router(mlp_spec(num_experts=EXPERTS), routing))
    return GPTModel(
        config=config,
        transformer_layer_spec=decoder_block_spec(config, [layer] * num_layers),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        position_embedding_type="rope",
        share_embeddings_and_output_weights=False,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )


def initial_weights(num_layers=2):
    return full_named_tensors(build_moe_gpt(num_layers=num_layers))


def modality_forward_step(data_iterator, model):
    """The forward step with the hand-off of the batch's modality ids to the routers."""
    batch = next(data_iterator)
    set_modality_ids(model, batch["modality_ids"])
    return gpt_forward_step(iter([batch]), model)


def record_routing(routers):
    """Forward hooks that keep each router's (input, probs, routing_map); returns the record list."""
    record = []
    for router in routers:
        router.register_forward_hook(
            lambda m, args, out: record.append((m.layer_index, args[0].detach(), out[0].detach(), out[1].detach()))
        )
    return record


def reference_routing(x, weight, allowed, k, score_function, bias):
    """Readable top-k over the allowed experts: tokens ``x [T, h]`` -> (probs, map) ``[T, E]``."""
    logits = x.float() @ weight.float().t()  # [T, E]
    if score_function == "softmax":
        masked = logits.masked_fill(~allowed, float("-inf"))
        values, index = masked.topk(k, dim=-1)
        weights = torch.softmax(values, dim=-1)
    else:
        scores = torch.sigmoid(logits)
        selection = (scores + (bias if bias is not None else 0.0)).masked_fill(~allowed, float("-inf"))
        index = selection.topk(k, dim=-1).indices
        chosen = scores.gather(1, index)
        weights = chosen / chosen.sum(-1, keepdim=True)  # every k: routing.normalize_top1
    probs = torch.zeros_like(logits).scatter(1, index, weights)
    return probs, torch.zeros_like(logits, dtype=torch.bool).scatter(1, index, True)


# -- (a) restricted experts and reduced top-k: EP=2 == EP=1 ----------------------------------------


def restricted_gradients(weights, biases, sub, global_indices, score_function):
    routing = RoutingConfig(expert_bias=biases is not None)
    gpt = build_moe_gpt(routing=routing, score_function=score_function)
    load_full_named_tensors(gpt, weights)
    routers = elastic_routers([gpt])
    if biases is not None:
        for router in routers:
            router.expert_bias.copy_(biases[router.layer_index])
    model = wrap_with_ddp([gpt])
    elastic.apply(model, sub)
    record = record_routing(routers)
    indices = local_micro_batches(global_indices)
    losses = get_forward_backward_func()(
        forward_step_func=gpt_forward_step,
        data_iterator=iter([make_batch(i) for i in indices]),
        model=model,
        num_microbatches=len(indices),
        seq_length=SEQ,
        micro_batch_size=2,
        forward_only=False,
    )
    elastic.reset(model)
    allowed = torch.zeros(EXPERTS, dtype=torch.bool)
    allowed[list(sub.experts)] = True
    worst = 0.0
    for layer, x, probs, routing_map in record:
        router = routers[layer]
        assert not routing_map[:, ~allowed].any(), "an excluded expert was selected"
        assert (routing_map.sum(-1) == sub.top_k).all(), "every token must get exactly k experts"
        bias = None if biases is None else biases[layer]
        ref_probs, ref_map = reference_routing(
            x.reshape(-1, HIDDEN), router.weight.detach(), allowed, sub.top_k, score_function, bias
        )
        assert torch.equal(routing_map, ref_map), "routing map differs from the reference top-k"
        worst = max(worst, float((probs - ref_probs).abs().max()))
    return {
        "losses": [d["lm loss"] for d in losses],
        "grads": full_named_tensors(model[0], main_grad_or_grad),
        "probs_vs_reference": worst,
        "topk_after_reset": [(r.topk, r.config.moe_router_topk) for r in routers],
    }


def max_rel_diff(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30))


def test_restricted_experts_and_topk_match_across_expert_parallel_layouts():
    """Width (experts 1, 4, 7 excluded) and top-1, with softmax and with sigmoid + expert bias; the
    last case also skips layer 0 (depth), which every EP rank must skip alike."""
    weights = run_distributed(initial_weights, 1)[0]
    g = torch.Generator().manual_seed(7)
    biases = 0.2 * torch.randn(2, EXPERTS, generator=g)
    biases[:, [1, 4, 7]] = 5.0  # excluded experts with a bias that would win without the mask
    cases = (("softmax", None, (0, 1)), ("sigmoid", biases, (0, 1)), ("sigmoid", biases, (1,)))
    for score_function, bias, layers in cases:
        sub = SubNetwork(layers=layers, experts=(0, 2, 3, 5, 6), top_k=1)
        kwargs = dict(weights=weights, biases=bias, sub=sub, global_indices=[0, 1], score_function=score_function)
        ref = run_distributed(restricted_gradients, 1, **kwargs)[0]
        ep = run_distributed(restricted_gradients, 2, ParallelSizes(ep=2), **kwargs)
        assert ref["probs_vs_reference"] < 1e-6
        assert ref["topk_after_reset"] == [(TOP_K, TOP_K)] * 2
        for rank in range(2):  # rank r's micro-batch is the reference's micro-batch r
            assert max_rel_diff(ep[rank]["losses"][0], ref["losses"][rank]) <= RTOL
        grads = ref["grads"]
        # A top-1 sigmoid gate is divided by itself (routing.normalize_top1): 1.0, so the router's gradient
        # is zero up to rounding (~1e-10 of the largest gradient), whose bits follow the reduction order of
        # each layout and CPU: it is held to 1e-7 of the largest gradient (a real one is ~1e-3 of it).
        floor = 1e-7 * max(float(g.abs().max()) for g in grads.values())
        for name, grad in grads.items():
            rounding_only = score_function == "sigmoid" and name.endswith("router.weight")
            assert (
                float((ep[0]["grads"][name] - grad).abs().max()) <= floor
                if rounding_only
                else max_rel_diff(ep[0]["grads"][name], grad) <= RTOL
            ), f"{score_function} {name}"
            if name.startswith("decoder.layers.") and int(name.split(".")[2]) not in layers:
                assert not grad.any(), f"skipped layer got a gradient: {name}"
            elif any(f".local_experts.{e}." in name for e in (1, 4, 7)):
                assert not grad.any(), f"excluded expert got a gradient: {name}"
            elif name.endswith("router.weight"):  # softmax over k=1 expert is constant: no gradient
                assert not grad[[1, 4, 7]].any()
                assert grad[[0, 2, 3, 5, 6]].any() == (score_function == "sigmoid")


# -- (b) agnostic routing never reads modality ids; isolated routing keeps to partitions --------------


def modality_routing(weights, routing, modality_batches):
    """Forward/backward of one micro-batch per entry of ``modality_batches`` (its modality ids)."""
    gpt = build_moe_gpt(routing=routing)
    load_full_named_tensors(gpt, weights)
    routers = elastic_routers([gpt])
    record = record_routing(routers)
    outputs = []
    for ids in modality_batches:
        batch = make_batch(0)
        gpt.zero_grad(set_to_none=True)
        record.clear()
        set_modality_ids(gpt, ids)
        loss = gpt(batch["tokens"], batch["position_ids"], attention_mask=None, labels=batch["labels"])
        loss.sum().backward()
        maps = [(layer, m) for layer, _, _, m in record]
        outputs.append(
            {"loss": loss.detach(), "grads": {n: p.grad.clone() for n, p in gpt.named_parameters()}, "maps": maps}
        )
    return outputs


def test_agnostic_routing_ignores_modality_ids_and_isolated_routing_keeps_partitions():
    weights = run_distributed(initial_weights, 1)[0]
    g = torch.Generator().manual_seed(3)
    ids_a = torch.randint(0, 2, (2, SEQ), generator=g)
    ids_b = 1 - ids_a
    agnostic = run_distributed(
        modality_routing,
        1,
        weights=weights,
        routing=RoutingConfig(expert_bias=False),
        modality_batches=[ids_a, ids_b, torch.full((2, SEQ), 3)],
    )[0]
    for other in agnostic[1:]:
        assert torch.equal(other["loss"], agnostic[0]["loss"])
        for name, grad in agnostic[0]["grads"].items():
            assert torch.equal(other["grads"][name], grad), name

    routing = RoutingConfig(mode="modality_isolated", isolated_modalities=["text", "image"], expert_bias=False)
    isolated = run_distributed(modality_routing, 1, weights=weights, routing=routing, modality_batches=[ids_a, ids_b])[
        0
    ]
    for ids, result in zip((ids_a, ids_b), isolated):
        token_modality = ids.t().reshape(-1)  # the router's s-major token order
        for _, routing_map in result["maps"]:
            text, image = routing_map[token_modality == 0], routing_map[token_modality == 1]
            assert not text[:, 4:].any() and not image[:, :4].any(), "a token left its modality's partition"
            assert text[:, :4].any() and image[:, 4:].any()
    assert not torch.equal(isolated[0]["loss"], isolated[1]["loss"]), "isolated routing must depend on modality"


def isolated_loss(weights, ids):
    routing = RoutingConfig(mode="modality_isolated", isolated_modalities=["text", "image"], expert_bias=False)
    gpt = build_moe_gpt(routing=routing)
    load_full_named_tensors(gpt, weights)
    batch = make_batch(0)
    set_modality_ids(gpt, ids)
    return gpt(batch["tokens"], batch["position_ids"], attention_mask=None, labels=batch["labels"]).detach()


def isolated_errors(weights):
    """The messages of the isolated router without modality ids, and with a modality it has no partition for."""
    routing = RoutingConfig(mode="modality_isolated", isolated_modalities=["text", "image"], expert_bias=False)
    gpt = build_moe_gpt(routing=routing)
    load_full_named_tensors(gpt, weights)
    batch = make_batch(0)
    messages = []
    for ids in (None, torch.full((2, SEQ), MODALITIES.index("video"))):
        try:
            if ids is not None:
                set_modality_ids(gpt, ids)
            gpt(batch["tokens"], batch["position_ids"], attention_mask=None, labels=batch["labels"])
        except (RuntimeError, ValueError) as error:
            messages.append(str(error))
    return messages


def test_isolated_routing_refuses_missing_or_unpartitioned_modalities():
    weights = run_distributed(initial_weights, 1)[0]
    missing, video = run_distributed(isolated_errors, 1, weights=weights)[0]
    assert "set_modality_ids" in missing
    assert "['video'] have no expert partition" in video


def test_isolated_routing_slices_modality_ids_under_sequence_parallelism():
    weights = run_distributed(initial_weights, 1)[0]
    ids = torch.randint(0, 2, (2, SEQ), generator=torch.Generator().manual_seed(5))
    ref = run_distributed(isolated_loss, 1, weights=weights, ids=ids)[0]
    tp = run_distributed(isolated_loss, 2, ParallelSizes(tp=2), weights=weights, ids=ids)
    assert max_rel_diff(tp[0], ref) <= RTOL


# -- (c) expert bias lowers the load CV; (f) the callback's state survives a resume ---------------------


def skewed_weights(weights, logit=2.0):
    """Routers with unit-scale random logits plus about ``logit`` for experts 0 and 1 on hidden
    states along a direction u that every token embedding shares: most tokens pick 0 and 1."""
    g = torch.Generator().manual_seed(11)
    skewed = dict(weights)
    u = torch.randn(HIDDEN, generator=g)
    u /= u.norm()
    emb = skewed["embedding.word_embeddings.weight"]
    skewed["embedding.word_embeddings.weight"] = u + torch.randn(emb.shape, generator=g) / HIDDEN**0.5
    for name in list(skewed):
        if name.endswith("router.weight"):
            w = torch.randn(skewed[name].shape, generator=g) / HIDDEN**0.5  # logits ~ N(0, 1)
            w[:2] += logit * u / HIDDEN**0.5
            skewed[name] = w
    return skewed


def _moe_optimizer(model):
    return build_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-3, weight_decay=0.0, clip_grad=1.0, adam_eps=1e-5), model
    )


def _steps(model, optimizer, callback, ctx, steps, modality_ids):
    metrics = []
    for _ in range(steps):
        callback.on_step_begin(ctx)
        batches = []
        for i in local_micro_batches([0, 1]):
            batch = make_batch(i)
            batch["modality_ids"] = modality_ids
            batches.append(batch)
        result = train_step(
            model,
            optimizer,
            iter(batches),
            num_microbatches=len(batches),
            seq_length=SEQ,
            micro_batch_size=2,
            forward_step_func=modality_forward_step,
        )
        ctx.step += 1
        metrics.append(callback.on_step_end(ctx, result))
    return metrics


def bias_balancing(weights, expert_bias, steps, run_dir, resume_steps=0):
    routing = RoutingConfig(expert_bias=expert_bias, bias_update_rate=0.05)

    def fresh(seed):
        gpt = build_moe_gpt(seed=seed, routing=routing, score_function="sigmoid")
        load_full_named_tensors(gpt, weights)
        model = wrap_with_ddp([gpt])
        callback = MoECallback(ElasticConfig(), routing, 2, EXPERTS, TOP_K, seed=1)
        return model, _moe_optimizer(model), callback

    ids = torch.zeros(2, SEQ, dtype=torch.long)
    ids[:, SEQ // 2 :] = MODALITIES.index("image")
    model, optimizer, callback = fresh(1234)
    ctx = TrainContext(config=None, pg_collection=process_groups(), model=model, optimizer=optimizer, run_dir=run_dir)
    callback.on_train_start(ctx)
    metrics = _steps(model, optimizer, callback, ctx, steps, ids)
    out = {"metrics": metrics}
    if resume_steps:
        # Resume: a new model and callback from the model's and the callback's state (the bias is a
        # persistent buffer of the model); the next steps see the same weights, so they count alike.
        model_state = model[0].module.state_dict()
        callback_state = callback.state_dict()
        out["sharded_keys"] = [k for k in model[0].module.sharded_state_dict() if k.endswith("expert_bias")]
        resumed, resumed_opt, resumed_cb = fresh(4321)
        resumed[0].module.load_state_dict(model_state)
        resumed_cb.load_state_dict(callback_state)
        resumed_ctx = TrainContext(
            config=None,
            pg_collection=process_groups(),
            model=resumed,
            optimizer=resumed_opt,
            run_dir=run_dir,
            step=ctx.step,
        )
        resumed_cb.on_train_start(resumed_ctx)
        out["bias_after_load"] = [r.expert_bias.clone() for r in elastic_routers(resumed)]
        out["bias_saved"] = [r.expert_bias.clone() for r in elastic_routers(model)]
        _steps(model, optimizer, callback, ctx, resume_steps, ids)
        _steps(resumed, resumed_opt, resumed_cb, resumed_ctx, resume_steps, ids)
        out["usage"] = callback.usage
        out["usage_resumed"] = resumed_cb.usage
        out["bias"] = [r.expert_bias.clone() for r in elastic_routers(model)]
        out["bias_resumed"] = [r.expert_bias.clone() for r in elastic_routers(resumed)]
        callback.on_train_end(ctx)
    return out


def test_expert_bias_lowers_load_cv_and_callback_state_survives_resume(tmp_path):
    weights = skewed_weights(run_distributed(initial_weights, 1)[0])
    steps = 12
    plain = run_distributed(bias_balancing, 1, weights=weights, expert_bias=False, steps=steps, run_dir=str(tmp_path))[
        0
    ]
    biased = run_distributed(
        bias_balancing, 2, weights=weights, expert_bias=True, steps=steps, run_dir=str(tmp_path), resume_steps=1
    )
    cv_plain = [m["moe/load_cv"] for m in plain["metrics"]]
    cv_biased = [m["moe/load_cv"] for m in biased[0]["metrics"]]
    print(
        f"[moe] load CV without bias {cv_plain[0]:.2f} -> {cv_plain[-1]:.2f}, "
        f"with bias {cv_biased[0]:.2f} -> {cv_biased[-1]:.2f}"
    )
    assert cv_plain[0] > 1.0, "the skewed weights must concentrate the load for this test to bite"
    assert abs(cv_biased[0] - cv_plain[0]) < 0.1 * cv_plain[0], "both runs start from the same routing"
    assert sum(cv_biased[-3:]) < 0.6 * sum(cv_plain[-3:])
    assert biased[0]["metrics"][-1]["moe/bias_abs_mean"] > 0
    assert biased[0]["metrics"] == biased[1]["metrics"], "every DP rank reports the same metrics"
    # (f) bias, load counters and (stateless) sampler across a state_dict round trip
    result = biased[0]
    assert result["sharded_keys"], "the expert bias must be part of the distributed checkpoint"
    for saved, loaded in zip(result["bias_saved"], result["bias_after_load"]):
        assert saved.abs().sum() > 0 and torch.equal(saved, loaded)
    assert result["usage"].sum() > 0 and torch.equal(result["usage"], result["usage_resumed"])
    for a, b in zip(result["bias"], result["bias_resumed"]):
        assert torch.equal(a, b)
    # tokens were text (first half) and image (second half): both rows count, the others stay empty
    per_modality = result["usage"].sum((0, 2))
    assert per_modality[0] > 0 and per_modality[1] > 0 and per_modality[2:].sum() == 0
    assert (tmp_path / "plots" / "moe_expert_usage.png").is_file()


class FixedSampler:
    """Stands in for the ElasticSampler: the given sub-network at each step (1-based)."""

    def __init__(self, subs):
        self.subs = subs

    def sample(self, step, config=None):  # config: a stage's elastic section, unused here
        return self.subs[step - 1]


def bias_update_steps(weights, subs, run_dir):
    """One step per sub-network with the expert bias on; the bias and the step's counts after each."""
    routing = RoutingConfig(expert_bias=True, bias_update_rate=0.05)
    gpt = build_moe_gpt(routing=routing, score_function="sigmoid")
    load_full_named_tensors(gpt, weights)
    model = wrap_with_ddp([gpt])
    callback = MoECallback(ElasticConfig(enabled=True), routing, 2, EXPERTS, TOP_K, seed=1)
    callback.sampler = FixedSampler(subs)
    ctx = TrainContext(
        config=None, pg_collection=process_groups(), model=model, optimizer=_moe_optimizer(model), run_dir=run_dir
    )
    callback.on_train_start(ctx)
    routers = elastic_routers(model)
    history = [{"bias": torch.stack([r.expert_bias.clone() for r in routers]), "usage": callback.usage.clone()}]
    for _ in subs:
        _steps(model, ctx.optimizer, callback, ctx, 1, torch.zeros(2, SEQ, dtype=torch.long))
        history.append({"bias": torch.stack([r.expert_bias.clone() for r in routers]), "usage": callback.usage.clone()})
    return history


def test_bias_update_matches_megatron_at_full_width_and_spares_excluded_experts(tmp_path):
    weights = skewed_weights(run_distributed(initial_weights, 1)[0])
    experts = (0, 1, 3, 4, 6)
    subs = [
        SubNetwork(layers=(0, 1), experts=None, top_k=TOP_K),
        SubNetwork(layers=(0, 1), experts=experts, top_k=TOP_K),
    ]
    history = run_distributed(bias_update_steps, 2, weights=weights, subs=subs, run_dir=str(tmp_path))
    assert all(torch.equal(a["bias"], b["bias"]) for a, b in zip(*history)), "DP ranks hold the same bias"
    history = history[0]
    active = torch.zeros(EXPERTS, dtype=torch.bool)
    active[list(experts)] = True
    for step, sub in enumerate(subs, start=1):
        load = (history[step]["usage"] - history[step - 1]["usage"]).sum(1).double()  # [L, N] over both ranks
        moved = history[step]["bias"] - history[step - 1]["bias"]
        if sub.experts is None:  # Megatron's update; the tracker's loads are the ones it reduced
            expected = 0.05 * torch.sign(load.mean(-1, keepdim=True) - load)
        else:  # over the active experts only; excluded experts keep their bias
            mean = load[:, active].mean(-1, keepdim=True)
            expected = torch.where(active, 0.05 * torch.sign(mean - load), torch.zeros_like(load))
            assert not load[:, ~active].any()
        assert torch.allclose(moved.double(), expected, atol=1e-7), f"step {step}: {moved} != {expected}"
        assert moved.abs().sum() > 0


# -- (d) every rank draws the same sub-networks --------------------------------------------------------


def draw_subnetworks(steps):
    rank = torch.distributed.get_rank()
    torch.manual_seed(100 + rank)  # the global RNG streams differ per rank; the draws must not
    sampler = ElasticSampler(ElasticConfig(enabled=True), num_layers=16, num_experts=64, top_k=8, seed=1234)
    return [sampler.sample(step) for step in range(1, steps + 1)]


def test_all_ranks_draw_identical_subnetworks():
    draws = run_distributed(draw_subnetworks, 2, ParallelSizes(ep=2), steps=1000)
    assert draws[0] == draws[1]
    assert len(set(draws[0])) > 100, "the draws must vary over steps"


# -- (e) elastic depth under pipeline parallelism ---------------------------------------------------------


def elastic_pipeline(weights, steps, explicit, run_dir):
    num_layers = 4
    gpt = build_moe_gpt(num_layers=num_layers)
    load_full_named_tensors(gpt, weights)
    model = wrap_with_ddp([gpt])
    optimizer = _moe_optimizer(model)
    config = ElasticConfig(enabled=True, depth_full_prob=0.0, width_full_prob=0.5, topk_default_prob=0.5)
    callback = MoECallback(config, RoutingConfig(expert_bias=False), num_layers, EXPERTS, TOP_K, seed=5)
    ctx = TrainContext(config=None, pg_collection=process_groups(), model=model, optimizer=optimizer, run_dir=run_dir)
    callback.on_train_start(ctx)
    ids = torch.zeros(2, SEQ, dtype=torch.long)
    metrics = _steps(model, optimizer, callback, ctx, steps, ids)
    layers = {layer.layer_number - 1: layer for layer in elastic.decoder_layers(model)}
    explicit_results = []
    for kept in explicit:  # sub-networks that skip every layer of one stage
        elastic.apply(model, SubNetwork(layers=tuple(kept), experts=None, top_k=TOP_K))
        batches = [make_batch(i) for i in range(2)]
        result = train_step(model, optimizer, iter(batches), num_microbatches=2, seq_length=SEQ, micro_batch_size=2)
        untouched = {i: all(not main_grad_or_grad(p).any() for p in layer.parameters()) for i, layer in layers.items()}
        elastic.reset(model)
        explicit_results.append({"loss": result.loss, "no_grad_layers": sorted(i for i, u in untouched.items() if u)})
    restored = all("forward" not in vars(layer) for layer in layers.values())
    return {"metrics": metrics, "explicit": explicit_results, "local_layers": sorted(layers), "restored": restored}


def test_elastic_depth_trains_under_pipeline_parallelism(tmp_path):
    weights = run_distributed(initial_weights, 1, num_layers=4)[0]
    explicit = [(2, 3), (0,)]
    pp = run_distributed(
        elastic_pipeline,
        2,
        ParallelSizes(pp=2),
        timeout=60,
        weights=weights,
        steps=4,
        explicit=explicit,
        run_dir=str(tmp_path),
    )
    assert pp[0]["local_layers"] == [0, 1] and pp[1]["local_layers"] == [2, 3]
    assert pp[0]["metrics"] == pp[1]["metrics"], "both stages must apply the same sub-networks"
    depths = [m["elastic/depth"] for m in pp[0]["metrics"]]
    assert all(1 <= d <= 3 for d in depths)
    assert all(torch.isfinite(torch.tensor(m["moe/load_cv"])) for m in pp[0]["metrics"] if "moe/load_cv" in m)
    for rank in range(2):
        assert pp[rank]["restored"]
        for kept, result in zip(explicit, pp[rank]["explicit"]):
            assert torch.isfinite(torch.tensor(result["loss"]))
            skipped = [i for i in pp[rank]["local_layers"] if i not in kept]
            assert result["no_grad_layers"] == skipped, f"kept {kept}: rank {rank}"


def top1_gates(normalize_top1):
    routing = RoutingConfig(expert_bias=False, normalize_top1=normalize_top1)
    gpt = build_moe_gpt(routing=routing, score_function="sigmoid")
    routers = elastic_routers([gpt])
    elastic.apply([gpt], SubNetwork(layers=(0, 1), experts=None, top_k=1))
    record = record_routing(routers)
    batch = make_batch(0)
    with torch.no_grad():
        gpt(batch["tokens"], batch["position_ids"], attention_mask=None, labels=batch["labels"])
    elastic.reset([gpt])
    layer, x, probs, routing_map = record[0]
    scores = torch.sigmoid(x.reshape(-1, HIDDEN).float() @ routers[layer].weight.detach().float().t())
    return probs[routing_map], scores[routing_map]


@pytest.mark.parametrize("normalize_top1", [True, False])
def test_sigmoid_gates_at_top1_follow_the_normalisation_choice(normalize_top1):
    gates, scores = run_distributed(top1_gates, 1, normalize_top1=normalize_top1)[0]
    if normalize_top1:  # as at k > 1: the selected scores divided by their sum
        assert torch.allclose(gates, torch.ones_like(gates))
    else:  # Megatron-Core's rule: the raw score
        assert torch.allclose(gates, scores, atol=1e-6) and float(gates.mean()) < 0.99
