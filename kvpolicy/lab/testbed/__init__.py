"""A small trained retrieval model shipped with the package, so KV policies can be scored offline.

``load()`` returns ``(model, tokenizer)``: a standard ``Qwen3ForCausalLM`` (3 layers, 8 query and 4 KV heads,
RoPE) and its word-level tokenizer, from ``kvpolicy/lab/testbed/qwen3-model/``. Tasks live in
:mod:`kvpolicy.lab.testbed.tasks`, training in :mod:`kvpolicy.lab.testbed.train`
(``python -m kvpolicy.lab.testbed.train --out DIR --seed 0``).
transformers is imported only when load() is called.
"""

from __future__ import annotations

from pathlib import Path

MODEL_DIR = Path(__file__).with_name("qwen3-model")
# KVzap surrogates trained on this model from the KVzip+ oracle (`kvpolicy train-kvzap`, docs/results.md).
SURROGATES = {"linear": Path(__file__).with_name("kvzap-linear"), "mlp": Path(__file__).with_name("kvzap-mlp")}


def testbed_oracle_config() -> dict:
    """KVzip+ prompt ids for the testbed vocabulary (its ``<repeat>`` token; no text prompt)."""
    from kvpolicy.lab.testbed.tokenizer import VOCAB

    return {"repeat_prompt_ids": [VOCAB.repeat], "continue_prompt_ids": [VOCAB.repeat], "prompt_suffix_ids": []}


def with_testbed_defaults(policy: str, config: dict) -> dict:
    """``config`` completed for the bundled testbed: its trained surrogate for ``kvzap_*``, its oracle prompt ids
    for ``kvzip_plus``. What ``config`` sets wins."""
    if policy in ("kvzap_linear", "kvzap_mlp"):
        return {"surrogate": str(SURROGATES[policy.removeprefix("kvzap_")]), **config}
    if policy == "kvzip_plus":
        return {**testbed_oracle_config(), **config}
    return dict(config)


def load(directory: str | Path | None = None, dtype=None):
    """Load the shipped testbed ``(model, tokenizer)`` (or the ones saved in ``directory``), in eval mode.

    Works offline: nothing is fetched from a hub.
    """
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    path = Path(directory) if directory is not None else MODEL_DIR
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no testbed model in {path} "
                                "(train one: python -m kvpolicy.lab.testbed.train --out DIR)")
    kwargs = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = Qwen3ForCausalLM.from_pretrained(str(path), **kwargs)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return model, tokenizer


__all__ = ["MODEL_DIR", "SURROGATES", "load", "testbed_oracle_config", "with_testbed_defaults"]
