"""What a user reads out of a model: hook points as graph outputs, run_with_cache, and the
analyses built on the cache (logit lens, direct logit attribution), and collect: a few points over a
whole corpus, written as shards a trainer reads (corpus, shards, collect, collect_ray).
"""
