"""Long-context evaluation suite on the testbed tasks (held-out seeds, exact-match scoring).

``evaluate_policy(model, tokenizer, "kvzap_mlp", {"threshold": -4, ...}, tasks, lengths, n)`` runs the suite
under a KV policy (``None`` = full cache); ``run_suite`` takes any ``generate_fn`` instead.
"""

from kvpolicy.lab.eval.suite import (
    DEFAULT_LENGTHS,
    EVAL_SEED,
    EvalResult,
    SuiteResult,
    evaluate_policy,
    greedy_generate_fn,
    run_suite,
    score_example,
)

__all__ = [
    "DEFAULT_LENGTHS",
    "EVAL_SEED",
    "EvalResult",
    "SuiteResult",
    "evaluate_policy",
    "greedy_generate_fn",
    "run_suite",
    "score_example",
]
