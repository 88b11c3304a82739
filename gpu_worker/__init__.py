"""Pull-based GPU workers: claim whole batches per model from the scheduler, run them
on an engine (one per modality), publish results back through Redis."""
