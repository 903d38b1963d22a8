"""EmbedLens Workflow: what do the visual tokens of multimodal LLMs encode?"""

__version__ = "0.1.0"
