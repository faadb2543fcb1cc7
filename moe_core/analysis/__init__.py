"""What the model does, measured: balance metrics, specialisation and model cards, expert profiles and
ablations, the per-token walkthrough, comparisons of two routings, and exports."""
