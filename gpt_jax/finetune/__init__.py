"""Adapting trained models: adapters (LoRA, soft prompts) and their frozen base, LoRA merging,
progressive layer stacking."""
