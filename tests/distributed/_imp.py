import json, sys, itertools
from pathlib import Path
import torch
from megatron_ext.consa.allocation import write_allocation
from megatron_ext.testing.distributed import run_distributed
from tests.distributed.test_consa_planted import allocation_losses

L, H = 4, 2

def main():
    run = Path(sys.argv[1])
    allocs = [torch.ones(L, H, dtype=torch.bool)]
    names = ["allFA"]
    for l in range(L):
        for h in range(H):
            a = torch.ones(L, H, dtype=torch.bool); a[l, h] = False
            allocs.append(a); names.append(f"swa{l}.{h}")
    allocs.append(torch.zeros(L, H, dtype=torch.bool)); names.append("allSWA")
    losses = run_distributed(allocation_losses, 1, run_dir=str(run), timeout=900, allocations=allocs, batches=int(sys.argv[2]))[0]
    base = losses[0]
    for n, v in zip(names, losses):
        print(f"{n:8s} {v:.4f} {v-base:+.4f}")

if __name__ == "__main__":
    main()
