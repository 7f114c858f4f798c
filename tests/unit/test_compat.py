"""The compat layer: CPU support and the fixes it applies, each in a fresh interpreter (they change
process state), and the version gate of the Megatron-Core internals with the wrappers around them."""

import subprocess
import sys
import textwrap

import pytest
import torch

from megatron_ext.compat import (
    SUPPORTED_MEGATRON_CORE,
    MegatronInternalError,
    datasets,
    distributed,
    layers,
    moe,
    optim,
    recompute,
    safe_load,
)
from megatron_ext.compat.internals import Internal


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_inactive_when_cuda_is_available():
    result = run_python(
        """
        import torch
        torch.cuda.is_available = lambda: True
        original = torch.cuda.current_device
        from megatron_ext.compat import cpu_support_active, enable_cpu_support
        assert enable_cpu_support() is False
        assert cpu_support_active() is False
        assert torch.cuda.current_device is original
        from torch.overrides import _get_current_function_mode_stack
        assert not _get_current_function_mode_stack()
        print("inactive")
        """
    )
    assert result.returncode == 0, result.stderr
    assert "inactive" in result.stdout


def test_the_mode_is_suspended_only_inside_the_block():
    result = run_python(
        """
        import torch
        from torch.overrides import _get_current_function_mode_stack
        from megatron_ext.compat import enable_cpu_support
        from megatron_ext.compat.cpu import cuda_redirect_suspended
        assert enable_cpu_support() is True
        assert torch.zeros(1, device="cuda").device.type == "cpu"  # mapped by the mode
        with cuda_redirect_suspended():
            assert not _get_current_function_mode_stack()
            try:
                torch.zeros(1, device="cuda")
            except (AssertionError, RuntimeError):
                print("unmapped inside")
        assert len(_get_current_function_mode_stack()) == 1
        assert torch.zeros(1, device="cuda").device.type == "cpu"
        print("restored")
        """
    )
    assert result.returncode == 0, result.stderr
    assert "unmapped inside" in result.stdout and "restored" in result.stdout


def test_refuses_other_megatron_core_versions():
    result = run_python(
        """
        from megatron.core import package_info
        package_info.__version__ = "0.15.0"
        from megatron_ext.compat import enable_cpu_support
        enable_cpu_support()
        """
    )
    assert result.returncode != 0
    assert "written for megatron-core 0.16.1" in result.stderr
    assert "megatron-core 0.15.0 is installed" in result.stderr


def test_cuda_requests_land_on_cpu_and_cuda_rng_is_the_cpu_generator():
    result = run_python(
        """
        import torch
        from megatron_ext.compat import enable_cpu_support
        assert enable_cpu_support() is True
        assert enable_cpu_support() is True  # idempotent
        assert torch.zeros(2, device="cuda").device.type == "cpu"
        assert torch.zeros(2, device=torch.cuda.current_device()).device.type == "cpu"
        assert torch.ones(3, device=torch.device("cuda", 0)).device.type == "cpu"
        t = torch.ones(3)
        assert t.cuda() is t and t.to("cuda").device.type == "cpu"
        assert torch.tensor([1], device="cuda", pin_memory=True).device.type == "cpu"
        torch.cuda.manual_seed(7); a = torch.rand(5)
        torch.manual_seed(7); b = torch.rand(5)
        assert torch.equal(a, b)
        state = torch.cuda.get_rng_state(); x = torch.rand(3)
        torch.cuda.set_rng_state(state); assert torch.equal(x, torch.rand(3))
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            s.wait_stream(torch.cuda.current_stream())
        s.record_event().synchronize()
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


# -- the version gate of the Megatron-Core internals (megatron_ext.compat.internals) --------------

COMPAT_MODULES = (layers, moe, optim, distributed, datasets, recompute, safe_load)
DECLARED = [internal for module in COMPAT_MODULES for internal in module.INTERNALS]

# What each compat module reaches into; a symbol dropped from its declarations would go unchecked.
EXPECTED_SYMBOLS = {
    "megatron.core.models.gpt.gpt_model.GPTModel.__init__",
    "megatron.core.models.common.embeddings.rotary_pos_embedding.RotaryEmbedding._apply_scaling",
    "torch.distributed.checkpoint.filesystem.FileSystemReader.read_metadata",
    "torch.distributed.checkpoint.default_planner.DefaultLoadPlanner.load_bytes",
    "megatron.core.datasets.gpt_dataset.GPTDataset._build_document_sample_shuffle_indices",
    "megatron.core.datasets.blended_dataset.BlendedDataset._build_indices",
    "megatron.core.transformer.transformer_layer.TransformerLayer._forward_attention",
    "megatron.core.transformer.transformer_layer.TransformerLayer._forward_mlp",
    "megatron.core.transformer.transformer_layer.TransformerLayer.forward",
    "megatron.core.transformer.transformer_block.TransformerBlock.forward",
    "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding._yarn_get_concentration_factor_from_config",
    "megatron.core.transformer.attention.Attention.forward",
    "megatron.core.transformer.moe.router.TopKRouter.__init__",
    "megatron.core.transformer.moe.router.TopKRouter.routing",
    "megatron.core.transformer.moe.router.TopKRouter._apply_expert_bias",
    "megatron.core.transformer.moe.token_dispatcher.MoEAlltoAllTokenDispatcher.preprocess",
    "megatron.core.transformer.transformer_config.TransformerConfig.moe_router_topk",
    "megatron.core.transformer.moe.moe_utils.topk_routing_with_score_function",
    "megatron.core.transformer.moe.moe_utils.apply_router_token_dropping",
    "megatron.core.transformer.moe.moe_utils.get_moe_layer_wise_logging_tracker",
    "megatron.core.transformer.moe.moe_utils.save_to_aux_losses_tracker",
    "megatron.core.transformer.multi_token_prediction.MTPLossLoggingHelper.save_loss_to_tracker",
    "megatron.core.optimizer._get_param_groups",
    "torch.distributed.distributed_c10d._world.pg_map",
    "torch.distributed.distributed_c10d.GroupMember.WORLD",
    "megatron.core.parallel_state.destroy_model_parallel",
    "megatron.core.datasets.gpt_dataset.GPTDataset._query_document_sample_shuffle_indices",
    "megatron.core.datasets.megatron_dataset.MegatronDataset.__init__",
    "megatron.core.tensor_parallel.random.HAVE_TE",
    "megatron.core.tensor_parallel.random.CheckpointWithoutOutput.__init__",
    "megatron.core.tensor_parallel.random.CheckpointWithoutOutputFunction.forward",
    "megatron.core.tensor_parallel.random.CheckpointWithoutOutput._recompute",
    "megatron.core.tensor_parallel.layers.ColumnParallelLinear.forward",
    "megatron.core.tensor_parallel.layers.RowParallelLinear.forward",
    "megatron.core.tensor_parallel.layers.LinearWithGradAccumulationAndAsyncCommunication.forward",
    "megatron.core.tensor_parallel.layers.LinearWithFrozenWeight.forward",
}


def test_the_compat_modules_declare_every_internal_they_use():
    assert {internal.symbol for internal in DECLARED} == EXPECTED_SYMBOLS


@pytest.mark.parametrize("internal", DECLARED, ids=lambda internal: f"{internal.symbol}{internal.parameters or ''}")
def test_declared_internal_exists_with_the_relied_on_signature(internal):
    """Fails with the symbol, what changed and megatron-core 0.16.1 in the message."""
    internal.check()


@pytest.mark.parametrize(
    "internal,problem",
    [
        (Internal("megatron.core.optimizer", "_get_param_groups_renamed"), "does not exist"),
        (
            Internal("megatron.core.optimizer", "_get_param_groups", parameters=("model_chunks", "lr")),
            "without the parameters ['lr']",
        ),
        (
            Internal(
                "megatron.core.optimizer", "_get_param_groups", parameters=("config", "model_chunks"), positional=True
            ),
            "leading positional parameters are ['model_chunks', 'config']",
        ),
        (
            Internal("megatron.core.optimizer", "_get_param_groups", source_contains=("not in the source",)),
            "no longer contains ['not in the source']",
        ),
        (Internal("megatron.core.no_such_module", "anything"), "cannot be imported"),
    ],
    ids=["missing", "parameter", "order", "source", "module"],
)
def test_a_changed_internal_fails_loudly_with_symbol_and_version(internal, problem):
    with pytest.raises(MegatronInternalError) as err:
        internal.check("megatron_ext.compat.optim.megatron_param_groups")
    message = str(err.value)
    assert internal.symbol in message and problem in message
    assert f"megatron-core {SUPPORTED_MEGATRON_CORE}" in message
    assert "megatron_ext.compat.optim.megatron_param_groups" in message


def test_every_compat_entry_point_refuses_other_megatron_core_versions():
    result = run_python(
        """
        from types import SimpleNamespace
        from megatron.core import package_info
        package_info.__version__ = "0.17.0"
        from megatron_ext.compat import MegatronInternalError, fix_recompute_without_te
        from megatron_ext.compat import datasets, distributed, layers, moe, optim, safe_load
        calls = {
            "safe_load.enable_safe_loading": safe_load.enable_safe_loading,
            "layers.forward_attention": lambda: layers.forward_attention(None, None),
            "layers.forward_mlp": lambda: layers.forward_mlp(None, None),
            "layers.rope_mscale": lambda: layers.rope_mscale(None),
            "layers.skip_layer": lambda: layers.skip_layer(None),
            "layers.direct_linears": lambda: layers.direct_linears([]).__enter__(),
            "moe.set_topk": lambda: moe.set_topk(None, 1),
            "moe.topk_selection_bias": lambda: moe.topk_selection_bias(None, None).__enter__(),
            "moe.reset_token_counts": lambda: moe.reset_token_counts(None),
            "moe.capacity_factor": lambda: moe.capacity_factor(None, 1.0).__enter__(),
            "moe.take_aux_losses": moe.take_aux_losses,
            "moe.take_mtp_losses": lambda: moe.take_mtp_losses(1),
            "optim.megatron_param_groups": lambda: optim.megatron_param_groups([], None),
            "distributed.destroy_process_groups_but_world": distributed.destroy_process_groups_but_world,
            "datasets.sample_span_from": lambda: datasets.sample_span_from(None, None, 0),
            "recompute.fix_recompute_without_te": fix_recompute_without_te,
        }
        for name, call in calls.items():
            try:
                call()
            except MegatronInternalError as err:
                message = str(err)
                assert "megatron_ext.compat." + name in message, message
                assert "as they are in megatron-core 0.16.1" in message, message
                assert "megatron-core 0.17.0 is installed" in message, message
            else:
                raise AssertionError(name + " ran on megatron-core 0.17.0")
        print("refused", len(calls))
        """
    )
    assert result.returncode == 0, result.stderr
    assert "refused 16" in result.stdout


# -- the wrapped internals' behaviour -----------------------------------------------------------


class _Layer(torch.nn.Module):
    """Stands in for a TransformerLayer: a parameter, a layer number, a forward that changes its input."""

    def __init__(self):
        super().__init__()
        self.layer_number = 3
        self.weight = torch.nn.Parameter(torch.ones(4))

    def forward(self, hidden_states, attention_mask=None, context=None, **kwargs):
        return hidden_states * self.weight, context


def test_a_skipped_layer_returns_hidden_states_and_context_unchanged_until_unskipped():
    layer, hidden, context = _Layer(), torch.randn(3, 2, 4), torch.randn(5, 2, 4)
    layers.skip_layer(layer)
    assert layers.is_skipped(layer)
    out = layer(hidden_states=hidden, attention_mask=None, context=context, rotary_pos_emb=None)
    assert out[0] is hidden and out[1] is context
    out = layer(hidden, None, context)  # positional: TransformerLayer._forward_attention's layout
    assert out[0] is hidden and out[1] is context
    assert layer(hidden_states=hidden)[1] is None
    layers.skip_layer(layer)  # skipping again is allowed
    layers.unskip_layer(layer)
    assert not layers.is_skipped(layer) and "forward" not in vars(layer)
    assert torch.equal(layer(hidden)[0], hidden * layer.weight)
    layers.unskip_layer(layer)  # nothing to undo


def test_a_skipped_layer_gives_its_parameters_exact_zero_gradients_when_asked():
    layer, hidden = _Layer(), torch.randn(3, 2, 4, requires_grad=True)
    layers.skip_layer(layer, zero_grads=True)
    out, _ = layer(hidden_states=hidden)
    assert torch.equal(out, hidden)
    out.sum().backward()
    assert layer.weight.grad is not None and torch.equal(layer.weight.grad, torch.zeros(4))
    assert torch.equal(hidden.grad, torch.ones_like(hidden))
    with torch.no_grad():
        assert layer(hidden)[0] is hidden


def test_skip_layer_refuses_to_replace_another_instance_forward():
    layer = _Layer()
    layer.forward = lambda *args, **kwargs: None
    with pytest.raises(RuntimeError, match="layer 3 already has an instance-level forward"):
        layers.skip_layer(layer)


def test_set_topk_writes_the_router_and_the_shared_config():
    from types import SimpleNamespace

    config = SimpleNamespace(moe_router_topk=2)
    first, second = SimpleNamespace(topk=2, config=config), SimpleNamespace(topk=2, config=config)
    moe.set_topk(first, 3)
    moe.set_topk(second, 3)
    assert first.topk == second.topk == config.moe_router_topk == 3


def test_selection_bias_is_handed_over_for_the_block_only():
    from types import SimpleNamespace

    learned, bias = torch.zeros(4), torch.tensor([0.0, float("-inf"), 0.0, 0.0])
    router = SimpleNamespace(expert_bias=learned)
    with moe.topk_selection_bias(router, bias):
        assert router.expert_bias is bias
    assert router.expert_bias is learned
    with pytest.raises(ValueError):
        with moe.topk_selection_bias(router, bias):
            raise ValueError("routing failed")
    assert router.expert_bias is learned


def test_sample_span_reads_the_other_stream_and_restores_the_token_stream():
    class Dataset:
        def __init__(self):
            self.dataset = "tokens"

        def _query_document_sample_shuffle_indices(self, idx):
            if idx < 0:
                raise IndexError(idx)
            return f"{self.dataset}[{idx}]", None

    dataset = Dataset()
    assert datasets.sample_span_from(dataset, "modality", 4) == "modality[4]"
    assert dataset.dataset == "tokens"
    with pytest.raises(IndexError):
        datasets.sample_span_from(dataset, "modality", -1)
    assert dataset.dataset == "tokens"


def test_recompute_fix_without_te_and_no_op_with_te():
    result = run_python(
        """
        from megatron.core.tensor_parallel import random as mcore_random
        from megatron_ext.compat import fix_recompute_without_te
        assert not mcore_random.HAVE_TE
        # The 0.16.1 defect: a plain CheckpointWithoutOutput() takes the FP8 path. If this fails,
        # megatron-core fixed it: drop megatron_ext.compat.recompute.
        assert mcore_random.CheckpointWithoutOutput().fp8 is True
        assert mcore_random.CheckpointWithoutOutput(fp8=None).fp8 is False
        mcore_random.HAVE_TE = True
        original = mcore_random.CheckpointWithoutOutput.__init__
        assert fix_recompute_without_te() is False
        assert mcore_random.CheckpointWithoutOutput.__init__ is original
        mcore_random.HAVE_TE = False
        assert fix_recompute_without_te() is True
        patched = mcore_random.CheckpointWithoutOutput.__init__
        assert fix_recompute_without_te() is True and mcore_random.CheckpointWithoutOutput.__init__ is patched
        assert mcore_random.CheckpointWithoutOutput().fp8 is False
        assert mcore_random.CheckpointWithoutOutput(fp8=False).fp8 is False
        print("fixed")
        """
    )
    assert result.returncode == 0, result.stderr
    assert "fixed" in result.stdout


def test_cpu_grouped_gemm_multiplies_each_expert_s_rows_by_its_weight():
    result = run_python(
        """
        import torch
        from megatron_ext.compat import enable_cpu_support
        enable_cpu_support()
        from megatron.core.transformer.moe import grouped_gemm_util as gg
        gg.assert_grouped_gemm_is_available()
        g = torch.Generator().manual_seed(0)
        sizes = torch.tensor([3, 0, 2])
        a = torch.randn(5, 4, generator=g)
        b = torch.randn(3, 4, 6, generator=g)
        expected = torch.cat([a[:3] @ b[0], a[3:5] @ b[2]])
        assert torch.equal(gg.ops.gmm(a, b, sizes, trans_b=False), expected)
        bt = b.transpose(1, 2).contiguous()
        assert torch.allclose(gg.ops.gmm(a, bt, sizes, trans_b=True), expected)
        print("gmm")
        """
    )
    assert result.returncode == 0, result.stderr
    assert "gmm" in result.stdout
