"""vLLM plugin (entry point group `vllm.general_plugins`): registers GenPage in every vLLM process.

vLLM loads general plugins in the driver, the engine core and each worker, which is where a custom
architecture must be known (registering only in the driver fails). Also registers the HF config so
vLLM's `AutoConfig` lookup of model_type "genpage" works there.
"""


def register() -> None:
    from vllm import ModelRegistry

    import policies.modeling_genpage  # noqa: F401  (AutoConfig / AutoModel registration)

    if "GenPageForCausalLM" not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model("GenPageForCausalLM", "policies.vllm_genpage:GenPageForCausalLMVllm")
