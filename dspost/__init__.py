"""dspost: post-training for DeepSeek-style Mixture-of-Experts models."""

__version__ = "0.1.0"
