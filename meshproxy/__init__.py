"""meshproxy: a model-aware L7 proxy for KServe v2 / Open Inference Protocol runtimes."""

__version__ = "0.1.0"
