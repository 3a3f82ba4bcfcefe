"""MoE sentence-embedding encoders on sentence-transformers.

- encoder.py: `build_encoder`, `MoEBertModel` (registered with transformers), `install_encoder_moe`,
  `load_encoder` — BERT FFN sublayers upcycled into `moescope.moe.layer.MoELayer`.
- pairs.py: real (anchor, positive) pairs from the built-in corpus or a Hugging Face pair dataset,
  split by source text without leakage.
- train.py: sentence-transformers' trainer and losses plus the MoE aux losses (`MoEAuxLoss`).
- evaluate.py: InformationRetrievalEvaluator per domain with bootstrap intervals, k-NN domain probe,
  routing capture for the LM's analysis code.
- compare.py: base vs dense vs MoE top-1/top-2 at matched steps.
"""

# Importing the package registers moescope's MoE BERT with transformers' Auto classes, so a
# saved MoE encoder loads with plain SentenceTransformer(path), without trust_remote_code.
from moescope.embed.encoder import register_architecture

register_architecture()
