"""paced: a curriculum service for LLM distillation at the frontier of student competence."""

__version__ = "0.1.0"
