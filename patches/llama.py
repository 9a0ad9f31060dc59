"""Dense Llama-style models: only norms and attention apply."""
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
RMSNORM = {"LlamaRMSNorm": "scale", "MistralRMSNorm": "scale", "Qwen2RMSNorm": "scale", "Qwen3RMSNorm": "scale"}
