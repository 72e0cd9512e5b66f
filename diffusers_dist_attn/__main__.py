"""`python -m diffusers_dist_attn generate ...` (same as the `diffusers-dist-attn` console script)."""

from .cli import main

raise SystemExit(main())
