"""Latent-alignment attention (Deng et al., NeurIPS 2018) on plated; it lands in a later issue."""
