"""The exactness contract in plain torch: plan, row order, the step, sync strategies, optimizers."""
