"""Evaluate the shipped demo model on the demo recipe's held-out documents, next to a unigram baseline.

    python scripts/eval_demo.py [MODEL_DIR]          (default v4jax/assets/demo; CPU is fine: about a minute)

Prints the model's mean next-token cross-entropy (nats/token) on the eval rows of configs/demo.yaml, and the
cross-entropy of a unigram model (token frequencies of the training documents, add-one smoothed) on the same
targets: the "trivial baseline" the demo's training run is compared with."""
import sys

import numpy as np

from v4jax import train as T

model_dir = sys.argv[1] if len(sys.argv) > 1 else "v4jax/assets/demo"
raw = T.load_config("configs/demo.yaml", ["model.preset=null", f"model.path={model_dir}", "model.overrides={}",
                                          f"data.tokenizer={model_dir}/tokenizer.json", "out_dir=/tmp/v4jax-eval-demo",
                                          "checkpoint_interval=0", "data.eval_batches=8", "batch=32"])
tr = T.Trainer(raw)
ev = tr.evaluate()
counts = np.bincount(tr.train_corpus.tokens, minlength=tr.cfg.vocab_size).astype(np.float64) + 1.0
logp = np.log(counts / counts.sum())
toks, mask = tr.eval_rows["tokens"].reshape(-1), tr.eval_rows["loss_mask"].reshape(-1).astype(bool)
uni = -float(np.mean(logp[toks[mask]]))
print(f"eval tokens {int(mask.sum()):,}: model {ev['eval_loss']:.4f} nats/token (MTP {ev.get('eval_mtp_loss', 0):.4f}),"
      f" unigram baseline {uni:.4f} nats/token; model/baseline {ev['eval_loss'] / uni:.3f}")
tr.close()
