"""ConSA: learned full / sliding-window attention allocation."""
