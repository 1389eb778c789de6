"""Weights streamed from disk one decoder layer at a time, and the layer-major runner every stage shares.

``memory``: the memory available to this process (cgroup v1 and v2 limits honoured) and the stream decision.
``checkpoint``: a local safetensors checkpoint's shards and tensor sizes, checked before any weight is read.
``layers``: where a model's decoder layers live while a run goes over them: in CPU memory (moved to the compute
device one at a time) or on disk (materialized from the shards one at a time on a meta skeleton, through
transformers' own weight conversions).
``parked``: the hidden states parked between layers: in memory up to a budget, the rest in a temporary file inside
the verb's output folder.
``runner``: the layer-major loop: embeddings for every batch, then each decoder layer on every parked batch, then
the head; profiling, perplexity and lm-eval log-likelihoods are callbacks on it.
"""
