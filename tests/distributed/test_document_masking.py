"""Document masking through the whole model: a document's logits do not change when other documents
are packed before or after it, for every attention this project builds (SDPA full attention, the
sliding-window kernels of static and gated hybrid layers, KV-head-mixed layers, LoZA's sinks, SGT
loops on both of their paths); and the masking is really on (without it they do change)."""

import pytest
import torch

from megatron_ext.models.documents import document_starts
from megatron_ext.testing.distributed import run_distributed
from tests.distributed import cp_bodies

EOD = 0
DOC = 12  # the document whose logits are compared; longer than the window (5) and the sinks (3)
HYBRID = {"hybrid_attention": {"enabled": True, "granularity": "kv_head", "window": 5, "mask_learning_steps": 2}}
LOZA = {
    "hybrid_attention": {
        "enabled": True,
        "method": "loza",
        "granularity": "layer",
        "window": 5,
        "sink_tokens": 3,
        "mask_learning_steps": 2,
    }
}
LOOPING = {"looping": {"enabled": True}}
MODELS = {
    # sections, structure (see cp_bodies.set_structure), SGT kept-heads path
    "full": ({}, {}, True),
    "swa": (HYBRID, {"allocation": [[False, False], [False, False]]}, True),
    "gated": (HYBRID, {"gates": [[0.3, 0.8], [0.5, 0.1]]}, True),
    "kv-head-mixed": (HYBRID, {"allocation": [[True, False], [False, True]]}, True),
    "loza-sink": (LOZA, {"allocation": [[False], [True]]}, True),
    "sgt-kept-heads": (
        {**HYBRID, **LOOPING},
        {"allocation": [[True, False], [False, False]], "loop": (1, 1, [2])},
        True,
    ),
    "sgt-all-heads": (
        {**HYBRID, **LOOPING},
        {"allocation": [[True, False], [False, False]], "loop": (1, 1, [2])},
        False,
    ),
    "sgt-dense": (LOOPING, {"loop": (0, 1, [0, 3])}, True),
}


def packed_rows(seed=0):
    """Three rows of 32 tokens that hold the same document ``B`` (``DOC`` tokens, EOD last) at
    positions 0, 20 and 9, packed with other documents; and the slice of ``B`` in each row."""
    g = torch.Generator().manual_seed(seed)

    def doc(n):
        return torch.cat([torch.randint(1, cp_bodies.VOCAB, (n - 1,), generator=g), torch.tensor([EOD])])

    b = doc(DOC)
    rows = [
        torch.cat([b, doc(20)]),  # B first
        torch.cat([doc(20), b]),  # B after a 20-token document
        torch.cat([doc(9), b, doc(11)]),  # B between two others
    ]
    return torch.stack(rows), [slice(0, DOC), slice(20, 20 + DOC), slice(9, 9 + DOC)]


def document_logits(sections, structure, kept_heads_path, mask):
    """The model's logits of ``B`` in each packed row, with or without document masking."""
    from megatron_ext.parallel import load_full_named_tensors
    from megatron_ext.run.builder import build_model
    from megatron_ext.sgt.looped_layer import LoopedTransformerLayer

    cfg = cp_bodies.run_config(sections)
    (model,) = build_model(cfg, cuda=False)
    load_full_named_tensors(model, cp_bodies.initial_weights(sections))
    cp_bodies.set_structure(model, structure)
    for module in model.modules():
        if isinstance(module, LoopedTransformerLayer):
            module.use_kept_heads_path = kept_heads_path
    model.eval()
    tokens, spans = packed_rows()
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        logits = model(tokens, positions, document_starts(tokens, EOD) if mask else None)
    return [logits[row, span] for row, span in enumerate(spans)]


@pytest.mark.parametrize("model", list(MODELS))
def test_a_documents_logits_do_not_depend_on_what_is_packed_around_it(model):
    sections, structure, kept_heads_path = MODELS[model]
    masked, unmasked = (
        run_distributed(
            document_logits, 1, sections=sections, structure=structure, kept_heads_path=kept_heads_path, mask=m
        )[0]
        for m in (True, False)
    )
    first = masked[0]
    for row, logits in enumerate(masked[1:], start=1):
        diff = float((logits - first).abs().max())
        assert diff <= 2e-5 * float(first.abs().max()), f"{model}: B's logits in row {row} differ by {diff:.2e}"
    # B is first in row 0, where masking changes nothing; packed after another document it changes its logits.
    assert torch.allclose(unmasked[0], masked[0], atol=1e-5)
    shift = float((unmasked[1] - unmasked[0]).abs().max())
    assert shift > 1e-3, f"{model}: without document masking B's logits did not change ({shift:.2e}): the test is void"


def reset_position_logits():
    """B's logits with data.reset_position_ids, B after A and B alone; and the rotary table's rows."""
    from megatron_ext.parallel import load_full_named_tensors
    from megatron_ext.run.builder import build_model

    sections = {"data": {"kind": "default", "reset_position_ids": True, "reset_attention_mask": True}}
    (model,) = build_model(cp_bodies.run_config(sections), cuda=False)
    load_full_named_tensors(model, cp_bodies.initial_weights({}))
    model.eval()
    tokens, spans = packed_rows()
    starts = document_starts(tokens, EOD)
    reset = torch.arange(tokens.shape[1]) - starts
    plain = torch.arange(tokens.shape[1]).expand_as(tokens)
    captured = []
    model.rotary_pos_emb.register_forward_hook(lambda module, args, output: captured.append(output))
    with torch.no_grad():
        out = {
            "reset": model(tokens, reset, starts),
            "plain": model(tokens, plain, starts),
            "reset-unmasked": model(tokens, reset, None),
            "plain-unmasked": model(tokens, plain, None),
        }
        table = model.rotary_pos_emb.get_emb(tokens.shape[1])[:, 0, 0]
    return {name: [logits[row, span] for row, span in enumerate(spans)] for name, logits in out.items()}, (
        captured[0],
        table,
        reset,
    )


def test_reset_position_ids_rotate_each_token_by_its_position_in_its_document():
    logits, (freqs, table, reset) = run_distributed(reset_position_logits, 1)[0]
    # The rotary frequencies of each token are the table's row at its reset position.
    assert freqs.shape == (reset.shape[1], reset.shape[0], 1, table.shape[1])
    assert torch.equal(freqs[:, :, 0], table[reset.t()])
    # B rotates by 0 .. 11 wherever it is packed: its logits agree at least as closely as under
    # plain positions, where only the relative offsets agree.
    for row in (1, 2):
        diff = float((logits["reset"][row] - logits["reset"][0]).abs().max())
        assert diff <= 2e-5 * float(logits["reset"][0].abs().max()), f"row {row}: {diff:.2e}"
    # Positions really act: without the document mask B after A sees A at other distances.
    shift = float((logits["reset-unmasked"][1] - logits["plain-unmasked"][1]).abs().max())
    assert shift > 1e-3, f"reset positions changed nothing ({shift:.2e})"
    assert torch.equal(logits["reset"][0], logits["plain"][0])  # B first: the same positions
