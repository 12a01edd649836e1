"""Pure tensor functions: KL estimators, advantage estimators (with discounted returns, GAE and
whitening), policy and value losses, off-policy corrections, and their split-invariant aggregation."""
