"""Other frameworks' checkpoints: `jaxgen.interop.hf` reads and writes HuggingFace ones."""

__all__ = ["hf"]
