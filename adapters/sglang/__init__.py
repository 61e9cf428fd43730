"""SGLang adapter: per-(layer, KV head) eviction on a head-row KV pool (SGLang 0.5.23 only).

Importing this package does not import SGLang. See docs/sglang.md for the design and what is supported.
"""

from kvpolicy.adapters.sglang.config import (
    AdapterConfigError,
    Granularity,
    SGLangPolicyConfig,
    TokenVote,
    parse_policy_flags,
)
from kvpolicy.adapters.sglang.token_vote import vote_tokens

__all__ = [
    "AdapterConfigError",
    "Granularity",
    "SGLangPolicyConfig",
    "TokenVote",
    "parse_policy_flags",
    "vote_tokens",
]
