"""`python -m raymb.config > docs/config.md`: the configuration reference, from the sections."""

from raymb.config.schema import markdown

print(markdown(), end="")
