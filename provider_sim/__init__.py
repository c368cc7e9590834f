"""A local server speaking the Anthropic Messages and OpenAI Chat Completions wire formats.

The official SDKs talk to it over HTTP exactly as to the real APIs; tests steer it with directives
in the prompt (see `provider_sim.script`).
"""

from provider_sim.common import STATS, SimStats
from provider_sim.server import create_app, start_provider_sim

__all__ = ["STATS", "SimStats", "create_app", "start_provider_sim"]
