"""Research tools beside the compiler: what the paper's claims are measured with.

Not on the compiler's import path (``import qsparse_compile`` imports none of this):

* :mod:`.scaling`: the Q-Sparse scaling law, its fit and the inference-optimal sparsity;
* :mod:`.calibrate` / :mod:`.calibration` / :mod:`.allocation`: training-free rotations and
  per-projection sparsity allocation (the compiler consumes only the rotations they write);
* :mod:`.rotation_folding`: an orthogonal rotation of the residual stream folded into a
  Llama-family model's weights (norm weights too), so q/k/v/gate/up inputs arrive rotated with
  no runtime product; per-kv-head v/o rotations and importance scales folded the same way;
* :mod:`.folded_rotations`: the training-free mode's rotations (PCA / Hadamard-like, global,
  per layer or per segment with runtime basis changes), their calibration, file and runtime
  multiply-add count; :mod:`.loss_allocation`: per-role sparsity allocation by TEAL's greedy
  on the measured calibration loss, at uniform top-K's activated-weight budget;
* :mod:`.measure`: measured input sparsity of an eager model under a configuration;
* :mod:`.models`: the small Llama-style model of the demo and the tests, and the SmolLM2-135M
  loader; :mod:`.data`: the Shakespeare corpus split by play.
"""
