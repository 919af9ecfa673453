"""torch.fx machinery of disparse_fx: tracing, analyses and graph rewrites.

This is the lower layer. It knows graphs, parameters, channels and masks; it knows
nothing of losses, data or training, and it never imports ``disparse_fx``.
Analyses return frozen dataclasses; transforms return new GraphModules and leave
their input untouched.
"""
