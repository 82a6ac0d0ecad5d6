"""Sweeps over one store: the sweep file's grammar (``spec``), the Ray Tune side (``tune``), and the summary read
from trial folders (``summary``)."""
