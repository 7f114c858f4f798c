"""Matplotlib for the run directory's figures: files only, no display."""


def pyplot():
    """``matplotlib.pyplot`` on the Agg (file) backend; imported on first use (figures are written
    at the end of a run, and most processes never draw one)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
