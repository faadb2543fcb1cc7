"""The model: routing schemes (routing), the MoE layer (layer), the decoder (gpt), parameter counts
(params, published) and checkpoints (checkpoint)."""
