"""What runs on each worker: the session seam to Ray Train, the feed, the epoch and follow loops."""
