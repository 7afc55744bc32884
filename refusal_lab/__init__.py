"""refusal_lab: find out how a chat model decides to refuse."""

from refusal_lab import quiet
from refusal_lab.config import register_resolvers

quiet.install()

__version__ = "0.1.0"

register_resolvers()
