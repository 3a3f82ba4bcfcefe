"""MoE sentence-embedding encoders on sentence-transformers.

- encoder.py: `build_encoder`, `MoETransformer` (a sentence-transformers module), `install_encoder_moe`,
  `load_encoder` — BERT FFN sublayers upcycled into `moescope.moe.layer.MoELayer`.
- pairs.py: real (anchor, positive) pairs from the built-in corpus or a Hugging Face pair dataset,
  split by source text without leakage.
- train.py: sentence-transformers' trainer and losses plus the MoE aux losses (`MoEAuxLoss`).
- evaluate.py: InformationRetrievalEvaluator per domain with bootstrap intervals, k-NN domain probe,
  routing capture for the LM's analysis code.
- compare.py: base vs dense vs MoE top-1/top-2 at matched steps.
"""
