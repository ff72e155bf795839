"""The plugin's model classes. vLLM imports each lazily via vllm_fse.MODEL_OVERRIDES."""
