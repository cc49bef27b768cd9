"""rrr: Reflect, Retry, Reward (Bensal et al., arXiv 2505.24726) as a command-line experiment runner."""

__version__ = "0.1.0"
