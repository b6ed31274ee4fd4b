"""Model implementations (Llama family) over the paged KV cache."""
