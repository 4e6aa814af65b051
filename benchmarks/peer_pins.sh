# The peer versions speed.py's worker processes run (sourced by gpu_prepare.sh and peer_sites.sh).
# FlagEmbedding 1.4.2 with the transformers 4.x it imports with: the versions ../shared/bench/ measured
# the peers with.
FLAG_PINS="transformers==4.57.3 tokenizers==0.22.1 huggingface-hub==0.36.0 sentence-transformers==5.1.2
    FlagEmbedding==1.4.2 datasets==4.4.1 dill==0.4.0 multiprocess==0.70.18"
# infinity, layered on the folder above, with the sentence-transformers 3.x it pins (under 5.x its
# subclass is not taken for a sentence-transformers model and silently mean-pools)
INFINITY_PINS="infinity-emb==0.0.78 sentence-transformers==3.4.1"
