"""jaxgen: pretrain BERT, GPT and T5 with JAX and Flax."""

__version__ = "0.1.0"
