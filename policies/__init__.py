"""GenPage policies: tokenizer, architecture (registered with the transformers Auto classes on import),
vLLM integration, training data and evaluation."""

from policies import modeling_genpage  # noqa: F401  (registers model_type "genpage" with the Auto classes)
