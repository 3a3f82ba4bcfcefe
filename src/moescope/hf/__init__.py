"""Released Hugging Face MoE models: adapters per router family, loading, held-out texts, routing hooks."""
