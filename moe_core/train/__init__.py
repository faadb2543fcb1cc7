"""Training: the one loop (loop) and the Training lab's jobs (lab)."""
