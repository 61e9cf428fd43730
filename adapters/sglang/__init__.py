"""SGLang adapter: a radix-cache backend that frees pruned tokens' KV slots (SGLang 0.5.19 only).

Importing this package does not import SGLang; :mod:`kvpolicy.adapters.sglang.cache` does (after a version
check in :mod:`kvpolicy.adapters.sglang._internals`). See docs/sglang.md for what works and what does not.
"""

from kvpolicy.adapters.sglang.config import AdapterConfigError, SGLangPolicyConfig, TokenVote, parse_policy_flags
from kvpolicy.adapters.sglang.layout import DUMMY_SLOT, SequenceLayout, decode_positions, extend_positions
from kvpolicy.adapters.sglang.token_vote import vote_tokens

__all__ = [
    "DUMMY_SLOT",
    "AdapterConfigError",
    "SGLangPolicyConfig",
    "SequenceLayout",
    "TokenVote",
    "decode_positions",
    "extend_positions",
    "parse_policy_flags",
    "vote_tokens",
]
