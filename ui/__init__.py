"""The Gradio views of the playground, one file each; app.py wires them. Everything below ui/ is gradio-free."""
