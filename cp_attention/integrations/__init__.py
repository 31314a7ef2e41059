"""Adapters that plug cp_attention into other libraries. Each lives in its own module and imports its library
only when used: `import cp_attention` (or this package) imports none of them.

- `cp_attention.integrations.diffusers`: a "cp_attention" attention backend for diffusers, with context
  parallelism (ring, Ulysses, Unified) on diffusers' own meshes.
"""
