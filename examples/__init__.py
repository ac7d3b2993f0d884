"""Example recordings and scripts, installed as ``scoreq_live.examples`` so ``scoreq-live demo`` finds them."""
