"""The Gradio app of finetune-helper (installed as the package ``finetune_helper_app``)."""
