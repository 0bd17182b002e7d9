"""Research tools beside the compiler: what the paper's claims are measured with.

Not on the compiler's import path (``import qsparse_compile`` imports none of this):

* :mod:`.scaling`: the Q-Sparse scaling law, its fit and the inference-optimal sparsity;
* :mod:`.calibrate` / :mod:`.calibration` / :mod:`.allocation`: training-free rotations and
  per-projection sparsity allocation (the compiler consumes only the rotations they write);
* :mod:`.rotation_folding`: an orthogonal rotation of the residual stream folded into a
  Llama-family model's weights (norm weights too), so q/k/v/gate/up inputs arrive rotated with
  no runtime product;
* :mod:`.measure`: measured input sparsity of an eager model under a configuration;
* :mod:`.models`: the small Llama-style model of the demo and the tests, and the SmolLM2-135M
  loader; :mod:`.data`: the Shakespeare corpus split by play.
"""
