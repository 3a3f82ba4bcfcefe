"""The MoE layer (pure computation) and its installation into GPT-2 (upcycling, save/load)."""
