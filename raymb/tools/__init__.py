"""Commands on a finished checkpoint, without Ray: eval, predict, sample, export."""
