"""``data.modality_loss_rescaling``: each modality's mean token loss, weighted by ``data.loss_weights``
(equal without them) over the modalities present; refused where tokens carry no modality ids."""

import pytest
import torch

from megatron_ext.config import ConfigError, from_dict
from megatron_ext.run import RunConfig
from megatron_ext.training.preflight import check_inputs
from megatron_ext.training.step import masked_mean_loss


def _batch():
    # 6 text targets (loss 1), 2 image targets (loss 4), one masked-out audio target.
    modality = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1, 3]])
    losses = torch.tensor([[1.0, 1, 1, 1, 1, 1, 4, 4, 9]])
    mask = torch.tensor([[1.0, 1, 1, 1, 1, 1, 1, 1, 0]])
    return {"loss_mask": mask, "label_modality_ids": modality}, losses


def test_each_present_modality_contributes_its_mean_equally_or_by_weight():
    batch, losses = _batch()
    plain, _ = masked_mean_loss(batch, losses)
    assert plain.item() == pytest.approx((6 * 1 + 2 * 4) / 8)  # the token mean: text dominates
    equal, _ = masked_mean_loss(batch, losses, rescale_modalities=True)
    assert equal.item() == pytest.approx((1 + 4) / 2)  # audio has no unmasked token: not counted
    weights = torch.tensor([1.0, 3.0, 1.0, 5.0])
    weighted, info = masked_mean_loss(batch, losses, loss_weights=weights, rescale_modalities=True)
    assert weighted.item() == pytest.approx((1 * 1 + 3 * 4) / 4)
    assert info["lm loss"].item() == pytest.approx(weighted.item())


def test_text_only_data_refuses_rescaling(tmp_path):
    with pytest.raises(ConfigError, match="data.modality_loss_rescaling needs token-level modality ids"):
        from_dict(RunConfig, {"data": {"kind": "synthetic", "modality_loss_rescaling": True}})
    prefix = tmp_path / "megatron_lm_text"
    prefix.with_suffix(".idx").write_bytes(b"")
    cfg = from_dict(
        RunConfig,
        {
            "data": {
                "kind": "indexed",
                "paths": [str(prefix)],
                "cache_dir": str(tmp_path),
                "modality_loss_rescaling": True,
            }
        },
    )
    with pytest.raises(ConfigError, match="have no modality stream"):
        check_inputs(cfg)
