"""Dense gated FFNs split into shared and routed experts with a router, training-free: the factorisation, the
modeling code shipped with every export, saving and loading, and the optional short fine-tune."""
