"""Offline planning tools beside the layers (docs/architecture.md): arithmetic over the configs that sizes the
deployment (`planning.capacity`, which writes docs/capacity.md's tables). Nothing running imports them; they may
import any layer, since they read what the Serve config deploys and how the ingress counts work."""
