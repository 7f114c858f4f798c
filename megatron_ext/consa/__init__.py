"""ConSA (arXiv 2606.18056): learned full / sliding-window attention allocation."""
