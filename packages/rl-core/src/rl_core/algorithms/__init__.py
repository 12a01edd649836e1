"""Pure tensor functions: KL estimators, advantage estimators, policy losses and their aggregation."""
