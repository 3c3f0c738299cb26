"""Model adapters: diffusers flow transformers (Wan2.1 first) and the built-in toy video world."""
