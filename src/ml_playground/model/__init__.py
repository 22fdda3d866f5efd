"""The GPT language model."""
