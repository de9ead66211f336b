"""Serving pieces: a paged K/V cache (:mod:`.kvcache`), the chunked-prefill planner
(:mod:`.prefill`), CUDA-graph capture of a step (:mod:`.graphs`) and a random-weight stack
served through them (:mod:`.runner`)."""
