"""Per-architecture adapters, installed as `freeloc.adapters`.

An adapter maps the core's two interfaces (temporal positions and self-attention) onto one model
architecture: it knows where the model keeps its temporal RoPE, which modules are self-attention, where
text tokens sit in the sequence and the length the model was trained on. It installs hooks or attention
processors and removes them exactly; it contains no attention math. Adapters may import diffusers; the
core (`freeloc`) never does.
"""
