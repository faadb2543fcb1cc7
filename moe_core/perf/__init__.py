"""Speed: the fast expert computation behind MoELayer (experts), benchmarks (bench, scale) and the
allocator page helper (pages)."""
