"""vbsw: variance based sample weighting and Taylor based sampling from files."""

__version__ = "0.1.0"
