"""A deterministic synthetic token stream, and Megatron's sample order for (micro-)batches.

Samples are dicts of ``[s]`` tensors (``tokens``, ``labels``, ``loss_mask``, ``position_ids``,
``modality_ids``, ``label_modality_ids``), the same contract as the indexed datasets.

Sample i concatenates motifs from a fixed set of eight-token motifs, chosen by a generator seeded
with (seed, split, i): within a motif the next token is determined by the previous one, so a
working model's loss falls quickly, and any sample can be produced from its index alone (which is
what makes resuming from ``consumed_samples`` exact).
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Optional

import torch

MOTIF_LENGTH = 8
_SPLIT_OFFSET = {"train": 0, "valid": 1 << 40}


class SyntheticMotifDataset:
    """``dataset[i]`` -> a sample of ``seq_length`` inputs and their next-token labels."""

    def __init__(self, vocab_size: int, seq_length: int, seed: int, split: str = "train", num_motifs: int = 32):
        if split not in _SPLIT_OFFSET:
            raise ValueError(f"split={split!r}: use one of {sorted(_SPLIT_OFFSET)}")
        if vocab_size < MOTIF_LENGTH:
            raise ValueError(f"vocab_size={vocab_size} is too small for {MOTIF_LENGTH}-token motifs")
        self.seq_length = seq_length
        self.seed = seed
        self.offset = _SPLIT_OFFSET[split]
        count = min(num_motifs * MOTIF_LENGTH, vocab_size) // MOTIF_LENGTH
        order = torch.randperm(vocab_size, generator=torch.Generator().manual_seed(seed))
        self.motifs = order[: count * MOTIF_LENGTH].view(count, MOTIF_LENGTH)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.offset + index)
        pieces = -(-(self.seq_length + 1) // MOTIF_LENGTH)
        choice = torch.randint(0, len(self.motifs), (pieces,), generator=g)
        text = self.motifs[choice].reshape(-1)[: self.seq_length + 1]
        return {
            "tokens": text[:-1].contiguous(),
            "labels": text[1:].contiguous(),
            "loss_mask": torch.ones(self.seq_length),
            "position_ids": torch.arange(self.seq_length),
            "modality_ids": torch.zeros(self.seq_length, dtype=torch.long),  # all text
            "label_modality_ids": torch.zeros(self.seq_length, dtype=torch.long),
        }


class CopyTaskDataset:
    """A planted long-range task: the second half of every sample repeats its first half.

    Sample i is ``h = seq_length // 2`` uniformly random tokens (seeded by (seed, split, i)), then the
    same ``h`` tokens again. The next token is predictable only from position ``h - 1`` on, and only
    by looking ``h - 1`` positions back: the loss mask covers exactly those positions, so a model
    whose every attention head sees fewer than ``h`` keys (sliding window ``W < h``) cannot get its
    loss below ln(vocab), and one with a full-attention head that learned the copy gets it to ~0.
    """

    def __init__(self, vocab_size: int, seq_length: int, seed: int, split: str = "train"):
        if split not in _SPLIT_OFFSET:
            raise ValueError(f"split={split!r}: use one of {sorted(_SPLIT_OFFSET)}")
        if seq_length < 4 or seq_length % 2:
            raise ValueError(f"seq_length={seq_length}: the copy task needs an even length >= 4")
        self.seq_length = seq_length
        self.vocab_size = vocab_size
        self.seed = seed
        self.offset = _SPLIT_OFFSET[split]

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        h = self.seq_length // 2
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.offset + index)
        half = torch.randint(0, self.vocab_size, (h,), generator=g)
        text = torch.cat([half, half, half[:1]])  # [2h + 1]: inputs and next-token labels
        loss_mask = torch.zeros(self.seq_length)
        loss_mask[h - 1 :] = 1.0  # label i = text[i + 1] = text[i + 1 - h] from i = h - 1 on
        return {
            "tokens": text[:-1].contiguous(),
            "labels": text[1:].contiguous(),
            "loss_mask": loss_mask,
            "position_ids": torch.arange(self.seq_length),
            "modality_ids": torch.zeros(self.seq_length, dtype=torch.long),
            "label_modality_ids": torch.zeros(self.seq_length, dtype=torch.long),
        }


def collate(samples: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Stack per-sample ``[s]`` tensors into the batch contract of ``gpt_forward_step`` (``[b, s]``).
    A blend's samples also carry Megatron's ``dataset_id`` (a numpy scalar), stacked as ``[b]``."""
    return {key: torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in samples[0]}


def step_micro_batches(
    dataset,
    consumed_samples: int,
    global_batch_size: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    device: Optional[torch.device] = None,
) -> Iterator[Dict[str, torch.Tensor]]:
    """This DP rank's micro-batches of the global batch starting at ``consumed_samples``, on
    ``device`` (the model's; None: where the dataset made them).

    Megatron's ``MegatronPretrainingSampler`` order: micro-step m takes the next
    ``micro_batch_size * dp_size`` samples and rank r gets its slice ``[r*mbs, (r+1)*mbs)``.
    """
    per_micro_step = micro_batch_size * dp_size
    for m in range(global_batch_size // per_micro_step):
        start = consumed_samples + m * per_micro_step + dp_rank * micro_batch_size
        batch = collate([dataset[i] for i in range(start, start + micro_batch_size)])
        if device is not None:
            batch = {name: tensor.to(device, non_blocking=True) for name, tensor in batch.items()}
        yield batch
