"""The maia attention backend for vLLM: paged KV in BF16 or FP8 over maia_serving.ops."""
