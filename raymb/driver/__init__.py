"""The driver: checks before Ray, the cluster and trainer, one run path for train and --follow."""
