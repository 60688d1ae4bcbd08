"""Pure quantization math: uniform group-wise grids (``grid``) and bit packing (``packing``)."""
